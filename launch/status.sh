#!/usr/bin/env bash
# Shows the queued resource's state and, per worker, whether a run is running and its last log line.
# shellcheck disable=SC2016  # remote scripts are written in single quotes: they expand on the worker
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/status.sh [--name RUN] [--worker W] [--dry-run]

Prints the queued resource's state (gcloud compute tpus queued-resources describe), then on every worker one
line per host:
  saejax-job HOST running PID | exited CODE | lost | absent
(lost: no exit code recorded and not running, e.g. killed hard or the VM restarted), followed by the last line
of that host's log and the runs present under REMOTE_DIR/logs.

  --name RUN  the run (default: the worker's logs/latest)
  --worker W  all (default), or a worker index / list such as 0 or 1,3
  --dry-run   print the gcloud commands instead of running them (also DRY_RUN=1)
  -h, --help  this help
USAGE
}

name='' worker=all
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; name=$2; shift ;;
    --name=*) name=${1#*=} ;;
    --worker) need_value "$@"; worker=$2; shift ;;
    --worker=*) worker=${1#*=} ;;
    *) usage_error "unexpected argument '$1'" ;;
  esac
  shift
done
check_selection "$name" "$worker"

load_env
require PROJECT ZONE TPU_NAME

state=$(qr_state)
if dry_run; then state='(dry run)'; fi
printf 'queued resource %s (%s, %s): %s\n' "$QR_NAME" "${ACCELERATOR:-?}" "$ZONE" "$state"
case $state in
  ACTIVE | '(dry run)') ;;
  *) exit 0 ;;
esac

script="$(remote_prelude); run=$(q "$name")"
script+="; $(remote_run_files)"
script+="$(remote_job_state)"
script+='; if [ -s "$log" ]; then echo "  $host last log line: $(tail -n 1 "$log")"; fi'
script+='; echo "  $host runs: $(ls "$d"/logs 2>/dev/null | grep -vx latest | tr "\n" " ")"'
ssh_workers "$worker" "$script"
