#!/usr/bin/env bash
# Tails a run's per-host logs on the workers, each line prefixed with its host.
# shellcheck disable=SC2016  # remote scripts are written in single quotes: they expand on the worker
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/logs.sh [--name RUN] [-n LINES] [--follow] [--worker W] [--dry-run]

Prints the last LINES lines of REMOTE_DIR/logs/RUN/host-$(hostname).log from every worker, each line prefixed
with [HOST]. With --follow, keeps printing new lines (Ctrl-C to stop; the run is not affected).

  --name RUN      the run (default: the worker's logs/latest)
  -n, --lines N   lines per host (default 50)
  -f, --follow    follow the logs
  --worker W      all (default), or a worker index / list such as 0 or 1,3
  --dry-run       print the gcloud commands instead of running them (also DRY_RUN=1)
  -h, --help      this help

To keep the logs after the slice is gone, copy them to the bucket from the workers, e.g.
  launch/run.sh --name copy-logs -- gcloud storage cp -r logs/RUN gs://BUCKET/logs/RUN
USAGE
}

name='' lines=50 follow=0 worker=all
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; name=$2; shift ;;
    --name=*) name=${1#*=} ;;
    -n | --lines) need_value "$@"; lines=$2; shift ;;
    --lines=*) lines=${1#*=} ;;
    -f | --follow) follow=1 ;;
    --worker) need_value "$@"; worker=$2; shift ;;
    --worker=*) worker=${1#*=} ;;
    *) usage_error "unexpected argument '$1'" ;;
  esac
  shift
done
check_selection "$name" "$worker"
[[ $lines =~ ^[0-9]+$ ]] || usage_error "--lines takes a whole number"

load_env
require PROJECT ZONE TPU_NAME

tail_args="-n $lines"
if ((follow)); then tail_args+=' -F'; fi
script="$(remote_prelude); run=$(q "$name")"
script+="; $(remote_run_files)"
if ((follow == 0)); then
  script+='if [ ! -e "$log" ]; then echo "[$host] no log $log"; exit 0; fi; '
fi
script+="tail $tail_args \"\$log\" | awk -v h=\"\$host\" '{ print \"[\" h \"] \" \$0; fflush() }'"
ssh_workers "$worker" "$script"
