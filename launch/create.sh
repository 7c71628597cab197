#!/usr/bin/env bash
# Requests the TPU slice as a queued resource (spot when SPOT=1).
# shellcheck disable=SC2016  # remote scripts are written in single quotes: they expand on the worker
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/create.sh [--wait] [--poll SECONDS] [--dry-run]

Requests the slice described by the env file (LAUNCH_ENV, default launch/env) as a queued resource:

  gcloud compute tpus queued-resources create QR_NAME --node-id=TPU_NAME --accelerator-type=ACCELERATOR
    --runtime-version=RUNTIME_VERSION [--spot] [--network ... --subnetwork ... --service-account ...]

The request returns once it is queued; the slice is usable when its state is ACTIVE (launch/status.sh).

  --wait          poll until the queued resource is ACTIVE (exit 1 if it ends FAILED or SUSPENDED)
  --poll SECONDS  seconds between polls with --wait (default 30)
  --dry-run       print the gcloud commands instead of running them (also DRY_RUN=1)
  -h, --help      this help
EOF
}

wait=0 poll=30
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --wait) wait=1 ;;
    --poll) need_value "$@"; poll=$2; shift ;;
    --poll=*) poll=${1#*=} ;;
    *) usage_error "unexpected argument '$1'" ;;
  esac
  shift
done
export DRY_RUN
[[ $poll =~ ^[0-9]+$ ]] || usage_error "--poll takes whole seconds"

load_env
require PROJECT ZONE TPU_NAME ACCELERATOR RUNTIME_VERSION

args=(queued-resources create "$QR_NAME" --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR"
  --runtime-version="$RUNTIME_VERSION")
if is_true "$SPOT"; then args+=(--spot); fi
if [[ -n ${NETWORK:-} ]]; then args+=(--network="$NETWORK"); fi
if [[ -n ${SUBNETWORK:-} ]]; then args+=(--subnetwork="$SUBNETWORK"); fi
if [[ -n ${SERVICE_ACCOUNT:-} ]]; then args+=(--service-account="$SERVICE_ACCOUNT" --scopes=cloud-platform); fi

gcloud_tpus "${args[@]}"
if ((wait)); then
  if ! wait_for_qr ACTIVE "$poll"; then
    fail "queued resource $QR_NAME did not become ACTIVE (launch/status.sh shows why)"
  fi
  dry_run || info "queued resource $QR_NAME is ACTIVE"
else
  dry_run || info "requested $QR_NAME ($ACCELERATOR); launch/status.sh shows when it is ACTIVE"
fi
