#!/usr/bin/env bash
# Keeps one run alive on a (spot) slice: recreates a preempted or deleted queued resource, sets it up, syncs the
# pinned commit and reruns the same command, which resumes from the last checkpoint.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/babysit.sh --name RUN [--max-restarts N] [--poll SECONDS] [--once] [--assume-state STATE]
                         [--dry-run] -- COMMAND [ARG...]

Loop, every POLL seconds, on the queued resource of the env file:
  NOT_FOUND                 create it, wait until ACTIVE, sync, setup, run (launch/create.sh, sync.sh, setup.sh,
  SUSPENDED / FAILED        run.sh --name RUN -- COMMAND); a preempted spot slice is deleted first
  ACTIVE                    ask every worker about RUN (launch/status.sh's probe):
                              running                -> nothing to do
                              exited 0 on every host and the --workdir has summary.json -> done, exit 0
                              (exit 0 without it: stopped by SIGTERM -> rerun; stop the babysitter first
                              when you stop a run by hand)
                              exited 1 or 2          -> exit 1: saejax failed (non-finite values / bad input),
                                                        a rerun would fail the same way
                              never started          -> sync, setup, run
                              lost / died elsewhere  -> stop.sh --force the survivors, sync, setup, rerun
                            an unreachable slice whose TPU VM is PREEMPTED or TERMINATED is recreated
  WAITING_FOR_RESOURCES, PROVISIONING, ACCEPTED, CREATING, SUSPENDING, DELETING, or unknown -> wait

Every recreation or rerun counts as a restart, except the first launch of a run that never started; after
--max-restarts the babysitter exits 1. The rerun is the same command with the same --workdir, so saejax resumes
from its last checkpoint (which must be on gs://, visible to every new host). Stopping the babysitter does not
stop the run. Run it where it survives your laptop: tmux on a small VM, or nohup ... > babysit.log 2>&1 &.

  --name RUN            run name, required (the same one across babysitter restarts)
  --max-restarts N      give up after N restarts (default 10)
  --poll SECONDS        seconds between checks, 10..3600 (default 120); after failed recoveries the wait
                        doubles, up to 30 minutes
  --once                one iteration, then exit
  --assume-state STATE  dry run only: the queued resource state to act on (default SUSPENDED, a preempted slice)
  --dry-run             print the gcloud commands instead of running them (also DRY_RUN=1)
  -h, --help            this help
USAGE
}

name='' max_restarts=10 poll=120 once=0 assume=''
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; name=$2; shift ;;
    --name=*) name=${1#*=} ;;
    --max-restarts) need_value "$@"; max_restarts=$2; shift ;;
    --max-restarts=*) max_restarts=${1#*=} ;;
    --poll) need_value "$@"; poll=$2; shift ;;
    --poll=*) poll=${1#*=} ;;
    --once) once=1 ;;
    --assume-state) need_value "$@"; assume=$2; shift ;;
    --assume-state=*) assume=${1#*=} ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'; put the command after --" ;;
    *) break ;;
  esac
  shift
done
export DRY_RUN
[[ -n $name ]] || usage_error "--name RUN is required (reruns must reuse the run's name)"
check_run_name "$name"
(($#)) || usage_error "no command given: launch/babysit.sh --name RUN -- COMMAND [ARG...]"
[[ $max_restarts =~ ^[0-9]+$ ]] || usage_error "--max-restarts takes a whole number"
if [[ ! $poll =~ ^[0-9]+$ ]] || ((poll < 10 || poll > 3600)); then usage_error "--poll takes 10..3600 seconds"; fi
if [[ -n $assume ]] && ! dry_run; then usage_error "--assume-state only makes sense with --dry-run"; fi
command=("$@")

load_env
require PROJECT ZONE TPU_NAME ACCELERATOR RUNTIME_VERSION REPO_URL
require_pinned_commit
ASSUMED_STATE=${assume:-SUSPENDED}
export ASSUMED_STATE LAUNCH_ENV

restarts=0 launched=0 failures=0
log() { printf '[%s] babysit %s: %s\n' "$(timestamp)" "$name" "$*" >&2; }

# count_restart REASON: one more restart, or exit 1 when the budget is spent.
count_restart() {
  if ((restarts >= max_restarts)); then
    fail "$1; --max-restarts=$max_restarts reached, giving up"
  fi
  restarts=$((restarts + 1))
  log "$1: restart $restarts/$max_restarts"
}

launch_run() {
  "$LAUNCH_DIR/sync.sh" && "$LAUNCH_DIR/setup.sh" && "$LAUNCH_DIR/run.sh" --name "$name" -- "${command[@]}"
}

# recreate STATE: deletes the queued resource unless it is gone, creates it, waits for ACTIVE, launches.
recreate() {
  if [[ $1 != NOT_FOUND ]]; then
    "$LAUNCH_DIR/delete.sh" --yes || return 1
    wait_for_qr NOT_FOUND "$poll" 1800 || return 1
  fi
  "$LAUNCH_DIR/create.sh" || return 1
  wait_for_qr ACTIVE "$poll" || return 1
  launch_run
}

attempt() {
  if "$@"; then
    launched=1 failures=0
  else
    failures=$((failures + 1))
    log "recovery failed ($failures in a row); retrying"
  fi
}

# The command's --workdir, if it has one.
workdir=''
for ((i = 0; i < ${#command[@]}; i++)); do
  case ${command[i]} in
    --workdir=*) workdir=${command[i]#--workdir=} ;;
    --workdir) if ((i + 1 < ${#command[@]})); then workdir=${command[i + 1]}; fi ;;
  esac
done

# run_completed: exit code 0 also follows a SIGTERM (a stop or a maintenance event: saejax checkpoints and exits
# 0), so "done" needs the run folder's summary.json, written only at the end. Without a --workdir, trust the 0.
run_completed() {
  if [[ -z $workdir ]]; then return 0; fi
  if [[ $workdir == gs://* ]]; then
    gcloud storage ls "$workdir/summary.json" --project="$PROJECT" >/dev/null 2>&1
  else
    local out
    out=$(ssh_workers all "$(remote_prelude); cd \"\$d\"; if [ -e $(q "$workdir/summary.json") ]; then echo saejax-summary; fi") ||
      true
    [[ $out == *saejax-summary* ]]
  fi
}

node_state() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --format='value(state)' \
    2>/dev/null || true
}

# on_active: the slice is up; what is the run doing?
on_active() {
  local probe out tag host st detail hosts=0 running=0 done_ok=0 absent=0 broken='' failed=''
  probe="$(remote_prelude); run=$(q "$name"); $(remote_run_files)$(remote_job_state)"
  if dry_run; then
    ssh_workers all "$probe"
    log "dry run: assuming run $name is running"
    return 0
  fi
  out=$(ssh_workers all "$probe") || true
  while read -r tag host st detail; do
    [[ $tag == saejax-job ]] || continue
    hosts=$((hosts + 1))
    case $st in
      running) running=$((running + 1)) ;;
      absent) absent=$((absent + 1)) ;;
      exited)
        case $detail in
          0) done_ok=$((done_ok + 1)) ;;
          1 | 2) failed+=" $host:$detail" ;;
          *) broken+=" $host:exit-$detail" ;;
        esac
        ;;
      *) broken+=" $host:$st" ;;
    esac
  done <<<"$out"

  if ((hosts == 0)); then
    local node
    node=$(node_state)
    case $node in
      PREEMPTED | TERMINATED | STOPPED)
        count_restart "TPU VM $TPU_NAME is $node"
        attempt recreate ACTIVE
        ;;
      *) log "could not reach the workers (TPU VM state: ${node:-unknown}); will retry" ;;
    esac
  elif [[ -n $failed ]]; then
    fail "run $name exited with code 1 or 2 on${failed} (1: non-finite values, 2: bad input); not restarting: launch/logs.sh --name $name"
  elif ((running > 0)) && [[ -z $broken ]] && ((absent == 0)); then
    log "running on $running/$hosts hosts"
  elif ((done_ok == hosts)); then
    if run_completed; then
      log "finished on all $hosts hosts"
      exit 0
    fi
    count_restart "run $name exited 0 on all $hosts hosts without $workdir/summary.json (stopped by SIGTERM, not finished)"
    attempt launch_run
  elif ((absent == hosts && launched == 0)); then
    log "run $name has not started on this slice: launching"
    attempt launch_run
  else
    count_restart "run $name is not running everywhere (running $running/$hosts, absent $absent${broken:+, broken$broken})"
    "$LAUNCH_DIR/stop.sh" --name "$name" --wait 300 --force || log "stop.sh failed; run.sh will refuse hosts still running"
    attempt launch_run
  fi
}

dry_run && log "dry run: assuming queued resource state $ASSUMED_STATE (--assume-state)"
while :; do
  state=$(qr_state)
  case $state in
    ACTIVE) on_active ;;
    NOT_FOUND)
      if ((launched == 0 && restarts == 0)); then
        log "no queued resource $QR_NAME: creating it"
      else
        count_restart "queued resource $QR_NAME is gone"
      fi
      attempt recreate NOT_FOUND
      ;;
    SUSPENDED | FAILED | PREEMPTED)
      count_restart "queued resource $QR_NAME is $state (preempted or failed)"
      attempt recreate "$state"
      ;;
    *) log "queued resource $QR_NAME is $state; waiting" ;;
  esac
  if ((once)); then exit $((failures > 0 ? 1 : 0)); fi
  delay=$poll
  if ((failures > 0)); then
    delay=$((poll << (failures < 5 ? failures : 5)))
    if ((delay > 1800)); then delay=1800; fi
  fi
  bounded_sleep "$delay"
done
