#!/usr/bin/env bash
# Sends SIGTERM to the recorded pid of a run on every worker; saejax saves a checkpoint and exits 0.
# shellcheck disable=SC2016  # remote scripts are written in single quotes: they expand on the worker
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/stop.sh [--name RUN] [--wait SECONDS] [--force] [--worker W] [--dry-run]

On every worker: reads REMOTE_DIR/logs/RUN/host-$(hostname).pid and sends SIGTERM (kill -TERM) to that pid
only, and only while that process still carries SAEJAX_RUN=RUN in its environment (a stale pid file is
ignored). Never matches processes by name. saejax catches SIGTERM, writes a checkpoint and exits 0; the same
launch/run.sh command later resumes from it. Then waits for the process to exit.

  --name RUN      the run (default: the worker's logs/latest)
  --wait SECONDS  how long to wait for the exit (default 600; 0: do not wait). Exit 1 if it is still running.
  --force         if it is still running after the wait, send SIGKILL to the same pid (loses the progress
                  since the last checkpoint; for a process stuck in a collective whose peers are gone)
  --worker W      all (default), or a worker index / list such as 0 or 1,3
  --dry-run       print the gcloud commands instead of running them (also DRY_RUN=1)
  -h, --help      this help
EOF
}

name='' wait_s=600 worker=all force=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; name=$2; shift ;;
    --name=*) name=${1#*=} ;;
    --wait) need_value "$@"; wait_s=$2; shift ;;
    --wait=*) wait_s=${1#*=} ;;
    --force) force=1 ;;
    --worker) need_value "$@"; worker=$2; shift ;;
    --worker=*) worker=${1#*=} ;;
    *) usage_error "unexpected argument '$1'" ;;
  esac
  shift
done
check_selection "$name" "$worker"
[[ $wait_s =~ ^[0-9]+$ ]] || usage_error "--wait takes whole seconds"

load_env
require PROJECT ZONE TPU_NAME

script="$(remote_prelude); run=$(q "$name")"
script+="; $(remote_run_files)"
script+='if [ ! -s "$pid_file" ]; then echo "$host: run $run has no pid file ($pid_file); nothing to stop"; exit 0; fi'
script+='; pid=$(cat "$pid_file")'
script+='; if ! alive "$pid"; then echo "$host: run $run (pid $pid) is not running"; exit 0; fi'
script+='; kill -TERM "$pid"'
script+="; echo \"\$host: sent SIGTERM to pid \$pid (run \$run)\"; waited=0; while [ \"\$waited\" -lt $wait_s ] && alive \"\$pid\"; do sleep 1; waited=\$((waited + 1)); done"
if ((force)); then
  script+='; if alive "$pid"; then echo "$host: pid $pid still running after '"$wait_s"' s; sending SIGKILL" >&2; kill -KILL "$pid"; sleep 1; fi'
fi
if ((wait_s > 0)); then
  script+="; if alive \"\$pid\"; then echo \"error: \$host: pid \$pid still running after $wait_s s\" >&2; exit 1; fi"
  script+='; for _ in 1 2 3 4 5 6 7 8 9 10; do if [ -s "$rc_file" ]; then break; fi; sleep 0.5; done'
  script+='; echo "$host: pid $pid exited, code $(cat "$rc_file" 2>/dev/null || echo unknown)"'
fi

ssh_workers "$worker" "$script"
