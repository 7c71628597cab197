#!/usr/bin/env bash
# Deletes the queued resource and its TPU VMs. Checkpoints in the bucket are not touched.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/delete.sh [--yes] [--dry-run]

  gcloud compute tpus queued-resources delete QR_NAME --force --quiet

--force deletes the TPU VMs with the request. Whatever runs on them dies without a checkpoint: run
launch/stop.sh first. The workers' disks (code, venv, logs under REMOTE_DIR/logs) go too; the bucket stays.
Asks for confirmation on a terminal unless --yes.

  -y, --yes   do not ask
  --dry-run   print the gcloud commands instead of running them (also DRY_RUN=1)
  -h, --help  this help
USAGE
}

yes=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    -y | --yes) yes=1 ;;
    *) usage_error "unexpected argument '$1'" ;;
  esac
  shift
done
export DRY_RUN

load_env
require PROJECT ZONE TPU_NAME

if ((yes == 0)) && ! dry_run; then
  if [[ ! -t 0 ]]; then
    die "refusing to delete $QR_NAME without --yes (stdin is not a terminal)"
  fi
  read -r -p "Delete queued resource $QR_NAME and its TPU VMs in $ZONE ($PROJECT)? [y/N] " answer
  case $answer in y | Y | yes | YES) ;; *) info "not deleted"; exit 1 ;; esac
fi
gcloud_tpus queued-resources delete "$QR_NAME" --force --quiet
