#!/usr/bin/env bash
# Installs saejax and its Python dependencies into a venv on every worker.
# shellcheck disable=SC2016  # remote scripts are written in single quotes: they expand on the worker
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/setup.sh [--dry-run]

On every worker (after launch/sync.sh has put the checkout in REMOTE_DIR):
  - creates the venv VENV with PYTHON (default python3.11; saejax needs Python >= 3.11). TPU VM images ship an
    older Python: when PYTHON is missing, the venv is made by uv (pip-installed for the user), which fetches
    Python PYTHON_VERSION (default 3.11);
  - pip install -e REMOTE_DIR[gcs] (gs:// run folders) plus JAX_PIP (default jax[tpu]) and PIP_EXTRA (space-separated, optional);
  - prints the jax and saejax versions it got.
Idempotent: rerun it after syncing a commit that changes pyproject.toml. launch/run.sh puts VENV/bin first on
PATH, so `python` in a run command is the venv's.

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
require PROJECT ZONE TPU_NAME

read -r -a extra <<<"$PIP_EXTRA"
packages=$(qjoin "$JAX_PIP" ${extra[@]+"${extra[@]}"})
python_q=$(q "$PYTHON")
version_q=$(q "$PYTHON_VERSION")

script="$(remote_prelude)"
script+='; if [ ! -d "$d"/.git ]; then echo "error: $host: no checkout at $d; run launch/sync.sh first" >&2; exit 1; fi'
script+="; if [ ! -x \"\$v\"/bin/python ]; then if command -v $python_q >/dev/null 2>&1 && $python_q -m venv \"\$v\"; then :; else rm -rf \"\$v\"; python3 -m pip install --user --quiet uv; \"\$HOME\"/.local/bin/uv venv --seed --python $version_q \"\$v\"; fi; fi"
script+='; if ! "$v"/bin/python -c "import sys; sys.exit(sys.version_info < (3, 11))"; then echo "error: $host: $v has Python $("$v"/bin/python -V 2>&1); saejax needs >= 3.11 (remove $v, set PYTHON)" >&2; exit 1; fi'
script+='; "$v"/bin/python -m pip install --quiet --upgrade pip'
script+="; \"\$v\"/bin/python -m pip install --quiet -e \"\$d[gcs]\" $packages"
script+='; echo "$host: $("$v"/bin/python -c "import jax, saejax; print(\"jax\", jax.__version__, \"saejax\", saejax.__file__)")"'

ssh_workers all "$script"
