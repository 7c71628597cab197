#!/usr/bin/env bash
# Starts one command on every worker, in the background, with a log and a pid file per host.
# shellcheck disable=SC2016  # remote scripts are written in single quotes: they expand on the worker
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/run.sh [--name RUN] [--dry-run] -- COMMAND [ARG...]

Starts COMMAND on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all), detached (setsid nohup),
in REMOTE_DIR with VENV/bin first on PATH, and returns. On each worker, under REMOTE_DIR/logs/RUN/:
  host-$(hostname).log   stdout and stderr (appended: a rerun of the same RUN adds to it)
  host-$(hostname).pid   the command's pid (launch/stop.sh sends SIGTERM to exactly that pid)
  host-$(hostname).rc    its exit code, once it has exited
and logs/latest points at RUN. The arguments reach the worker exactly as given (each one quoted).

A worker refuses to start when its checkout is not at COMMIT (run launch/sync.sh), or while RUN or another run
is still running there (one run at a time: the accelerator is not shared). Rerunning a saejax training
command with the same --workdir resumes from its last checkpoint.

  --name RUN  run name, a folder name (default run-YYYYMMDD-HHMMSS, UTC)
  --dry-run   print the gcloud commands instead of running them (also DRY_RUN=1)
  -h, --help  this help

example:
  launch/run.sh --name p160 -- python -m experiments.train --config=pythia160m --workdir=gs://BUCKET/runs/p160
EOF
}

name=''
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; name=$2; shift ;;
    --name=*) name=${1#*=} ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'; put the command after --" ;;
    *) break ;;
  esac
  shift
done
export DRY_RUN
(($#)) || usage_error "no command given: launch/run.sh [--name RUN] -- COMMAND [ARG...]"
name=${name:-run-$(date -u +%Y%m%d-%H%M%S)}
check_run_name "$name"

load_env
require PROJECT ZONE TPU_NAME
require_pinned_commit

args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  workdir=''
  case ${args[i]} in
    --workdir=*) workdir=${args[i]#--workdir=} ;;
    --workdir) if ((i + 1 < ${#args[@]})); then workdir=${args[i + 1]}; fi ;;
  esac
  if [[ -n $workdir && $workdir != gs://* ]]; then
    warn "--workdir $workdir is not on gs://: every host must see the same run folder, and a spot VM's disk goes with it"
  fi
done

command_q=$(qjoin "$@")
commit_q=$(q "$COMMIT")
# Runs detached on the worker: starts the command, records its pid, waits, records its exit code. SIGTERM goes
# to the command itself (the pid in the pid file), so saejax saves a checkpoint and exits 0.
wrapper='"$@" & echo "$!" > "$SAEJAX_PID_FILE"; wait "$!" && rc=0 || rc=$?; echo "$rc" > "$SAEJAX_RC_FILE"; echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) exit code $rc"'

script="$(remote_prelude); run=$(q "$name")"
script+="; $(remote_run_files)"
script+='if [ ! -d "$d"/.git ]; then echo "error: $host: no checkout at $d; run launch/sync.sh" >&2; exit 1; fi; cd "$d"'
script+="; head=\$(git rev-parse HEAD); if [ \"\$head\" != $commit_q ]; then echo \"error: \$host: \$d is at \$head, not $commit_q; run launch/sync.sh\" >&2; exit 1; fi"
script+='; mkdir -p "$dir"'
script+='; if [ -s "$pid_file" ] && alive "$(cat "$pid_file")"; then echo "error: $host: run $run is already running (pid $(cat "$pid_file")); launch/stop.sh --name $run" >&2; exit 1; fi'
script+='; prev=$(readlink "$d"/logs/latest 2>/dev/null || true); if [ -n "$prev" ] && [ "$prev" != "$run" ] && [ -s "$d"/logs/"$prev"/host-"$host".pid ] && alive "$(cat "$d"/logs/"$prev"/host-"$host".pid)" "$prev"; then echo "error: $host: run $prev is still running here (one run at a time: the accelerator is not shared); launch/stop.sh --name $prev" >&2; exit 1; fi'
script+='; rm -f "$pid_file" "$rc_file"; ln -sfn "$run" "$d"/logs/latest'
script+='; if [ -d "$v"/bin ]; then export PATH="$v"/bin:"$PATH" VIRTUAL_ENV="$v"; fi'
script+='; export SAEJAX_RUN="$run" SAEJAX_PID_FILE="$pid_file" SAEJAX_RC_FILE="$rc_file"'
script+="; printf '== %s start run=%s host=%s commit=%s\\n== command: %s\\n' \"\$(date -u +%Y-%m-%dT%H:%M:%SZ)\" \"\$run\" \"\$host\" \"\$head\" $(q "$command_q") >> \"\$log\""
script+="; setsid nohup bash -c $(q "$wrapper") saejax-run $command_q >> \"\$log\" 2>&1 < /dev/null &"
script+=' for _ in $(seq 100); do if [ -s "$pid_file" ]; then break; fi; sleep 0.1; done'
script+='; if [ ! -s "$pid_file" ]; then echo "error: $host: the command did not start; see $log" >&2; exit 1; fi'
script+='; echo "$host: started run $run, pid $(cat "$pid_file"), log $log"'

ssh_workers all "$script"
info "run $name: launch/status.sh --name $name | launch/logs.sh --name $name | launch/stop.sh --name $name"
