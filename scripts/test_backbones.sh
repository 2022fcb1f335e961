#!/usr/bin/env bash
# The backbone tests: cbd_fast on real timm, torchvision and Hugging Face transformers models
# (tests/core/test_backbones.py, tests/app/test_backbones_cli.py), in a venv whose torch torchvision
# imports with.
#
#   bash scripts/test_backbones.sh [pytest options...]
#
# Why a venv: the project's own environment runs a CPU torch (2.13) that no torchvision release
# imports with ("operator torchvision::nms does not exist"), and timm needs torchvision. The venv
# holds torch 2.14.1 (the CUDA build scripts/check_cuda_extension.sh also uses; it runs on the CPU)
# with torchvision 0.29.1, timm, transformers and safetensors. cbd_fast is not installed there: the
# tests import this checkout (PYTHONPATH) with its compiled extension switched off
# (CBD_FAST_DISABLE_EXT=1: the extension in the tree is built against the other torch), so the ops
# run on their pure-PyTorch backend (the kernels are tested against it by scripts/test.sh).
# CBD_FAST_REQUIRE_BACKBONES=1 turns a skipped backbone test (a package that does not import) into
# a failure; pytest collecting no test (exit 5) fails too.
#
# Environment (defaults in brackets):
#   CBD_FAST_BACKBONE_VENV [$CBD_FAST_CUDA_VENV or /opt/cudatorch]   reused, else created
#   CBD_FAST_BACKBONE_TORCH [2.14.1]        torch in a new venv (an existing one is kept)
#   CBD_FAST_TORCHVISION [0.29.1]           the torchvision that imports with it
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CBD_FAST_BACKBONE_VENV:-${CBD_FAST_CUDA_VENV:-/opt/cudatorch}}
TORCH_VERSION=${CBD_FAST_BACKBONE_TORCH:-2.14.1}
TORCHVISION_VERSION=${CBD_FAST_TORCHVISION:-0.29.1}
PY="$VENV/bin/python"

log() { echo "[backbones] $*"; }
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

start=$(date +%s)
# 1. The venv and its torch (shared with scripts/check_cuda_extension.sh, which builds there).
if [ -x "$PY" ] && have=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  log "reusing $VENV (torch $have)"
else
  log "creating $VENV with torch==$TORCH_VERSION (a few GB, ~2 min)"
  python3 -m venv "$VENV"
  pip_install "torch==$TORCH_VERSION" numpy
fi

# 2. The backbone packages and what the tests import (skipped when all import already).
probe='import torch, torchvision, timm, transformers, safetensors, pytest, tqdm, yaml, PIL, numpy
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"transformers {transformers.__version__}")'
if ! versions=$("$PY" -c "$probe" 2>/dev/null); then
  log "installing torchvision==$TORCHVISION_VERSION timm transformers safetensors pytest"
  pip_install "torchvision==$TORCHVISION_VERSION" timm transformers safetensors pytest tqdm pyyaml pillow numpy
  versions=$("$PY" -c "$probe") || { echo "[backbones] the backbone packages do not import in $VENV" >&2; exit 1; }
fi
log "environment ready in $(($(date +%s) - start)) s: $versions"

# 3. The tests, against this checkout.
cd "$ROOT"
ci_args=()
[ "${CI:-}" = true ] && ci_args=(--durations=10)
set +e
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" CBD_FAST_DISABLE_EXT=1 CBD_FAST_REQUIRE_BACKBONES=1 \
  HF_HUB_OFFLINE=1 "$PY" -m pytest -p no:cacheprovider "${ci_args[@]}" \
  tests/core/test_backbones.py tests/app/test_backbones_cli.py "$@"
rc=$?
set -e
case $rc in
  0) log "passed in $(($(date +%s) - start)) s" ;;
  5) echo "[backbones] pytest collected no tests (exit 5): treated as a failure" >&2; exit 1 ;;
  *) echo "[backbones] FAILED (pytest exit $rc)" >&2; exit 1 ;;
esac
