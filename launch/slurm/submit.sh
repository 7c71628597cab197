#!/usr/bin/env bash
# Submits launch/slurm/train.sbatch from a frozen snapshot of one commit, so edits to this checkout while the
# job waits in the queue (or after a requeue) do not change what runs.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'USAGE'
usage: launch/slurm/submit.sh [--commit SHA] [--sbatch OPTION]... [--dry-run] -- COMMAND [ARG...]

  1. refuses a dirty checkout (uncommitted changes to tracked files would not be in the snapshot);
  2. makes a snapshot of COMMIT (default HEAD) with git worktree add --detach, under SAEJAX_SNAPSHOTS
     (default ~/saejax-snapshots/<sha>; reused when it exists), on a filesystem every node sees;
  3. sbatch --chdir=<snapshot> [OPTION...] <snapshot>/launch/slurm/train.sbatch COMMAND [ARG...]

`python -m` puts the working directory first on sys.path, so the job imports the snapshot's saejax even with
an editable install of this checkout in SAEJAX_VENV. Slurm's own SBATCH_* variables (SBATCH_PARTITION,
SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...) apply as usual.

  --commit SHA     commit to run (default: HEAD of this checkout)
  --sbatch OPTION  one sbatch option, e.g. --sbatch=--nodes=4 --sbatch=--ntasks-per-node=8 (repeatable)
  --dry-run        print the git worktree and sbatch commands instead of running them (also DRY_RUN=1)
  -h, --help       this help

example:
  launch/slurm/submit.sh --sbatch=--nodes=4 -- python -m experiments.train --config=pythia160m \
    --workdir=/shared/runs/p160
USAGE
}

commit='' sbatch_opts=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --commit) need_value "$@"; commit=$2; shift ;;
    --commit=*) commit=${1#*=} ;;
    --sbatch) need_value "$@"; sbatch_opts+=("$2"); shift ;;
    --sbatch=*) sbatch_opts+=("${1#*=}") ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'; put the command after --" ;;
    *) break ;;
  esac
  shift
done
export DRY_RUN
(($#)) || usage_error "no command given: launch/slurm/submit.sh [OPTIONS] -- COMMAND [ARG...]"

git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO_ROOT is not a git checkout"
if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
  die "$REPO_ROOT has uncommitted changes; commit them (the job runs a snapshot of a commit)"
fi
sha=$(git -C "$REPO_ROOT" rev-parse --verify --quiet "${commit:-HEAD}^{commit}") ||
  die "${commit:-HEAD} is not a commit of $REPO_ROOT"

snapshot="${SAEJAX_SNAPSHOTS:-$HOME/saejax-snapshots}/$sha"
if [[ -d $snapshot ]]; then
  info "reusing snapshot $snapshot"
else
  run git -C "$REPO_ROOT" worktree add --detach "$snapshot" "$sha"
fi
run sbatch --chdir="$snapshot" ${sbatch_opts[@]+"${sbatch_opts[@]}"} "$snapshot/launch/slurm/train.sbatch" "$@"
