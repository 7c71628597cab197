#!/usr/bin/env bash
# Checks out the pinned COMMIT of REPO_URL on every worker.
# shellcheck disable=SC2016  # remote scripts are written in single quotes: they expand on the worker
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/sync.sh [--dry-run]

On every worker (gcloud compute tpus tpu-vm ssh --worker=all): clone REPO_URL into REMOTE_DIR if it is not
there, `git fetch`, and check out COMMIT (detached), then verify HEAD is COMMIT.

Refuses, before touching any worker:
  - an unpinned COMMIT (a branch, a tag, a short SHA): it must be a full 40-character SHA;
  - a dirty commit: this checkout is at COMMIT but has uncommitted changes, which the workers would not get.
And, on a worker, refuses to check out over uncommitted changes in REMOTE_DIR.

After a commit that changes dependencies (pyproject.toml), run launch/setup.sh again.

  --dry-run   print the gcloud commands instead of running them (also DRY_RUN=1)
  -h, --help  this help
EOF
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    *) usage_error "unexpected argument '$1'" ;;
  esac
  shift
done
export DRY_RUN

load_env
require PROJECT ZONE TPU_NAME REPO_URL
require_pinned_commit

# The local checkout: only read, to catch "I meant to ship my local edits".
if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  local_head=$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || true)
  if [[ $local_head == "$COMMIT" && -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    die "COMMIT $COMMIT is this checkout's HEAD, but the checkout has uncommitted changes the workers would not get: commit and push them, then pin the new SHA"
  fi
  if ! git -C "$REPO_ROOT" cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
    warn "COMMIT $COMMIT is not in this clone; make sure it is pushed to $REPO_URL"
  elif [[ -z $(git -C "$REPO_ROOT" branch -r --contains "$COMMIT" 2>/dev/null) ]]; then
    warn "COMMIT $COMMIT is on no remote-tracking branch here; push it, or the workers cannot fetch it"
  fi
fi

commit_q=$(q "$COMMIT")
script="$(remote_prelude)"
script+="; if [ ! -d \"\$d\"/.git ]; then git clone --quiet $(q "$REPO_URL") \"\$d\"; fi"
script+='; cd "$d"'
script+='; if [ -n "$(git status --porcelain --untracked-files=no)" ]; then echo "error: $host: $d has uncommitted changes; refusing to check out over them (git -C $d status)" >&2; exit 1; fi'
script+="; git remote set-url origin $(q "$REPO_URL")"
script+='; git fetch --quiet origin'
script+="; if ! git cat-file -e $(q "$COMMIT^{commit}") 2>/dev/null; then git fetch --quiet origin $commit_q; fi"
script+="; git -c advice.detachedHead=false checkout --quiet --detach $commit_q"
script+="; if [ \"\$(git rev-parse HEAD)\" != $commit_q ]; then echo \"error: \$host: checkout did not reach $commit_q\" >&2; exit 1; fi"
script+="; echo \"\$host: \$d at $commit_q\""

ssh_workers all "$script"
