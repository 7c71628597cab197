# shellcheck shell=bash disable=SC2016  # remote scripts are written in single quotes: they expand on the worker
# Sourced by every launch script: loads and checks the env file, quotes arguments, implements the dry run and
# builds the gcloud commands. Not meant to be run on its own.
#
# Dry run (DRY_RUN=1 or --dry-run): every gcloud / sbatch / git worktree command is printed, one per line as
# `+ CMD`, quoted so that bash (or Python's shlex.split, for arguments without newlines) reads back exactly the
# arguments that would have been passed, and is not run. Local read-only commands (git status, date) still run.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
export LAUNCH_DIR REPO_ROOT
SCRIPT_NAME=$(basename "$0")
# Printed commands go to the script's original stdout, even from inside $(...).
exec 3>&1

# Every setting the env file may hold. They are cleared before the file is read, so the file alone describes a
# deployment (a PROJECT or ZONE exported in your shell for something else is not picked up by accident).
ENV_VARS=(PROJECT ZONE TPU_NAME QR_NAME ACCELERATOR RUNTIME_VERSION SPOT BUCKET REPO_URL COMMIT PYTHON
  PYTHON_VERSION REMOTE_DIR VENV JAX_PIP PIP_EXTRA NETWORK SUBNETWORK SERVICE_ACCOUNT INTERNAL_IP)

die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 2; }
fail() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }
warn() { printf '%s: warning: %s\n' "$SCRIPT_NAME" "$*" >&2; }
info() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
usage_error() { printf '%s: error: %s (see %s --help)\n' "$SCRIPT_NAME" "$*" "$SCRIPT_NAME" >&2; exit 2; }

# need_value "$@": the option in $1 needs a value in $2.
need_value() {
  if (($# < 2)) || [[ -z $2 ]]; then usage_error "$1 needs a value"; fi
}

is_true() {
  case ${1:-} in 1 | true | yes | TRUE | YES | True | Yes) return 0 ;; *) return 1 ;; esac
}

dry_run() { is_true "${DRY_RUN:-0}"; }

# q ARG: ARG quoted for the shell; plain words (letters, digits, @%+=:,./-_) stay as they are, anything else is
# single-quoted (the quoting of Python's shlex.quote). An argument with a newline, tab or carriage return gets
# bash's $'...' instead, so that every printed or remote command stays on one line.
q() {
  local LC_ALL=C s=$1 nl=$'\n' tab=$'\t' cr=$'\r'
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s == *[$nl$tab$cr]* ]]; then
    s=${s//\\/\\\\}
    s=${s//\'/\\\'}
    s=${s//$nl/\\n}
    s=${s//$tab/\\t}
    s=${s//$cr/\\r}
    printf "\$'%s'" "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

# qjoin ARGS...: the arguments quoted and joined by spaces, one shell word each.
qjoin() {
  local out='' arg
  for arg in "$@"; do
    out+="${out:+ }$(q "$arg")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: runs an external command, or prints it under a dry run.
run() {
  if dry_run; then
    printf '+ %s\n' "$(qjoin "$@")" >&3
  else
    "$@"
  fi
}

load_env() {
  LAUNCH_ENV=${LAUNCH_ENV:-$LAUNCH_DIR/env}
  if [[ ! -f $LAUNCH_ENV ]]; then
    die "env file $LAUNCH_ENV not found: cp launch/env.example launch/env and edit it, or set LAUNCH_ENV=path"
  fi
  local var
  for var in "${ENV_VARS[@]}"; do unset "$var"; done
  # shellcheck source=/dev/null
  if ! source "$LAUNCH_ENV"; then
    die "could not read $LAUNCH_ENV (a shell syntax error?)"
  fi
  QR_NAME=${QR_NAME:-${TPU_NAME:-}}
  SPOT=${SPOT:-0}
  PYTHON=${PYTHON:-python3.11}
  PYTHON_VERSION=${PYTHON_VERSION:-3.11}
  REMOTE_DIR=${REMOTE_DIR:-saejax}
  VENV=${VENV:-saejax-venv}
  JAX_PIP=${JAX_PIP:-jax[tpu]}
  PIP_EXTRA=${PIP_EXTRA:-}
  INTERNAL_IP=${INTERNAL_IP:-0}
  check_values
}

# require VAR...: one line naming every required variable that is unset or empty.
require() {
  local missing=() var
  for var in "$@"; do
    if [[ -z ${!var:-} ]]; then missing+=("$var"); fi
  done
  if ((${#missing[@]})); then
    die "missing required variable(s) in $LAUNCH_ENV: ${missing[*]}"
  fi
}

# Format checks on whatever is set; `require` decides what must be.
check_values() {
  if [[ -n ${TPU_NAME:-} && ! $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    die "TPU_NAME=$TPU_NAME: use lowercase letters, digits and hyphens, starting with a letter"
  fi
  if [[ -n ${QR_NAME:-} && ! $QR_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    die "QR_NAME=$QR_NAME: use lowercase letters, digits and hyphens, starting with a letter"
  fi
  if [[ -n ${ACCELERATOR:-} && ! $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]]; then
    die "ACCELERATOR=$ACCELERATOR is not a TPU type such as v5p-64, v6e-16, v5litepod-16 or v4-32"
  fi
  case $SPOT in 0 | 1) ;; *) die "SPOT=$SPOT: use 1 (spot) or 0 (on-demand / reserved)" ;; esac
  case $INTERNAL_IP in 0 | 1) ;; *) die "INTERNAL_IP=$INTERNAL_IP: use 1 or 0" ;; esac
  if [[ -n ${BUCKET:-} && ! $BUCKET =~ ^gs://[a-z0-9][-_.a-z0-9]*(/.*)?$ ]]; then
    die "BUCKET=$BUCKET: use a gs:// URL such as gs://my-bucket"
  fi
  local var
  for var in REMOTE_DIR VENV; do
    case ${!var} in
      '~'*) die "$var=${!var}: write paths relative to the workers' home (saejax) or absolute (/opt/saejax)" ;;
      *[[:space:]]*) die "$var=${!var}: no spaces, please" ;;
    esac
  done
}

# The pinned commit: a full SHA, never a branch or tag that can move under a running job.
require_pinned_commit() {
  require COMMIT
  if [[ ! $COMMIT =~ ^[0-9a-f]{40}$ ]]; then
    die "COMMIT=$COMMIT is not pinned: set it to a full 40-character commit SHA (git rev-parse HEAD)"
  fi
}

# A run name is a folder name on every worker.
check_run_name() {
  if [[ ! $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    usage_error "run name '$1': use letters, digits, dot, underscore and hyphen"
  fi
}

# The checks shared by the scripts that select a run on some workers (status, logs, stop), after option parsing.
check_selection() {
  export DRY_RUN
  if [[ -n $1 ]]; then check_run_name "$1"; fi
  [[ $2 =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]] || usage_error "--worker takes all, an index, a list (1,3) or a range (1-3)"
}

# rpath PATH: a shell expression for PATH on a worker (relative paths are under the worker's home).
rpath() {
  case $1 in
    /*) q "$1" ;;
    *) printf '"$HOME"/%s' "$(q "$1")" ;;
  esac
}

# The first statements of every remote script: strict mode, the checkout, the venv, this host's name.
remote_prelude() {
  printf 'set -euo pipefail; d=%s; v=%s; host=$(hostname)' "$(rpath "$REMOTE_DIR")" "$(rpath "$VENV")"
}

# Remote statements that set the log folder of run $run (or of logs/latest when $run is empty) and this host's
# files in it. A pid is trusted only while that process carries SAEJAX_RUN=<run> in its environment, so a stale
# pid file (a reboot, a reused pid) never points a signal at somebody else's process: `alive PID [RUN]`.
remote_run_files() {
  printf '%s; ' \
    'if [ -z "$run" ]; then run=$(readlink "$d"/logs/latest 2>/dev/null || true); fi' \
    'if [ -z "$run" ]; then echo "$host: no runs under $d/logs"; exit 0; fi' \
    'dir="$d"/logs/"$run"; log="$dir"/host-"$host".log; pid_file="$dir"/host-"$host".pid; rc_file="$dir"/host-"$host".rc' \
    'alive() { kill -0 "$1" 2>/dev/null && grep -qzxF "SAEJAX_RUN=${2:-$run}" /proc/"$1"/environ 2>/dev/null; }'
}

# Remote statement (after remote_run_files) printing one line `saejax-job HOST STATE [DETAIL]`: absent (no
# folder for the run), running PID, exited CODE, or lost (neither running nor an exit code: killed hard, or the
# VM restarted).
remote_job_state() {
  printf '%s' 'if [ ! -d "$dir" ]; then echo "saejax-job $host absent"; elif [ -s "$rc_file" ]; then echo "saejax-job $host exited $(cat "$rc_file")"; elif [ -s "$pid_file" ] && alive "$(cat "$pid_file")"; then echo "saejax-job $host running $(cat "$pid_file")"; else echo "saejax-job $host lost"; fi'
}

# gcloud_tpus ARGS...: `gcloud compute tpus ARGS... --project=... --zone=...` (run or printed).
gcloud_tpus() {
  run gcloud compute tpus "$@" --project="$PROJECT" --zone="$ZONE"
}

# ssh_workers WORKER SCRIPT: runs SCRIPT under bash on the given workers (all, 0, 1-3, ...) of the TPU VM.
ssh_workers() {
  local worker=$1 script=$2 extra=()
  if is_true "$INTERNAL_IP"; then extra+=(--internal-ip); fi
  if ! dry_run && [[ $worker != [0-9] ]] && command -v ssh-add >/dev/null 2>&1 && ! ssh-add -l >/dev/null 2>&1; then
    warn "no key in ssh-agent; gcloud --worker=$worker needs one: ssh-add ~/.ssh/google_compute_engine"
  fi
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker="$worker" \
    ${extra[@]+"${extra[@]}"} --command="bash -c $(q "$script")"
}

# qr_state: prints the queued resource's state (ACTIVE, SUSPENDED, ...), NOT_FOUND, or UNKNOWN when gcloud
# failed for another reason (network, auth; the message goes to stderr). Under a dry run it prints the describe
# command and then ASSUMED_STATE.
qr_state() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" --project="$PROJECT" --zone="$ZONE"
    --format='value(state.state)')
  if dry_run; then
    run "${describe[@]}"
    printf '%s\n' "${ASSUMED_STATE:-ACTIVE}"
    return 0
  fi
  local out err_file
  err_file=$(mktemp)
  if out=$("${describe[@]}" 2>"$err_file"); then
    printf '%s\n' "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found|was not found|404' "$err_file"; then
    printf 'NOT_FOUND\n'
  else
    warn "gcloud queued-resources describe failed: $(head -n 1 "$err_file")"
    printf 'UNKNOWN\n'
  fi
  rm -f "$err_file"
}

# bounded_sleep SECONDS: sleeps, clamped to [1, 3600] seconds.
bounded_sleep() {
  local s=$1
  if ((s < 1)); then s=1; fi
  if ((s > 3600)); then s=3600; fi
  sleep "$s"
}

# wait_for_qr TARGET POLL [MAX_SECONDS]: polls until the queued resource is in state TARGET (ACTIVE or
# NOT_FOUND). Returns 1 when it reaches a state it cannot leave by itself (FAILED, SUSPENDED; or NOT_FOUND while
# waiting for ACTIVE) or after MAX_SECONDS (default: no limit; a spot request may wait for capacity for hours).
# Under a dry run it prints one describe and returns 0.
wait_for_qr() {
  local target=$1 poll=$2 max=${3:-0} state last='' start=$SECONDS
  if dry_run; then
    run gcloud compute tpus queued-resources describe "$QR_NAME" --project="$PROJECT" --zone="$ZONE" \
      --format='value(state.state)'
    return 0
  fi
  while :; do
    state=$(qr_state)
    if [[ $state == "$target" ]]; then return 0; fi
    if [[ $state != "$last" ]]; then info "queued resource $QR_NAME: $state (waiting for $target)"; last=$state; fi
    case $target:$state in
      ACTIVE:FAILED | ACTIVE:SUSPENDED | ACTIVE:NOT_FOUND) return 1 ;;
    esac
    if ((max > 0 && SECONDS - start >= max)); then
      warn "queued resource $QR_NAME still $state after ${max}s"
      return 1
    fi
    bounded_sleep "$poll"
  done
}

timestamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
