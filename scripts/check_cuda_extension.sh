#!/usr/bin/env bash
# Build the full CUDA extension against a CUDA build of torch in a separate venv, out of tree, and
# import it on this (GPU-less) machine: catches CUDA glue that no longer compiles or links.
#
#   bash scripts/check_cuda_extension.sh
#
# Environment (defaults in brackets):
#   CBD_FAST_CUDA_VENV [/opt/cudatorch]      reused when it holds a CUDA torch, else (re)created
#   CBD_FAST_CUDA_TORCH [2.14.1]             the torch version installed into a new venv
#   CUDA_HOME [/usr/local/cuda-13.0]         the toolkit (bin/nvcc, include/cuda_runtime.h)
#   TORCH_CUDA_ARCH_LIST [9.0]               target architectures
#   MAX_JOBS [2]                             parallel compile jobs
#   CBD_FAST_OPT_LEVEL [0]                   host optimisation (setup.py); 0 compiles fastest
# The source is copied to a temporary folder (`--keep` keeps it), so the CPU build in the tree is
# untouched.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CBD_FAST_CUDA_VENV:-/opt/cudatorch}
TORCH_VERSION=${CBD_FAST_CUDA_TORCH:-2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export CBD_FAST_FORCE_CUDA=1
export CBD_FAST_OPT_LEVEL=${CBD_FAST_OPT_LEVEL:-0}  # a link check needs no optimised code; -O0 compiles faster
unset CBD_FAST_SKIP_EXT CBD_FAST_NO_CUDA CBD_FAST_DISABLE_EXT TRITON_INTERPRET
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

log() { echo "[cuda-ext] $*"; }

[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "[cuda-ext] no nvcc under CUDA_HOME=$CUDA_HOME: set CUDA_HOME" >&2; exit 1; }

# 1. The venv with a CUDA torch (cached between runs).
cuda_torch_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
    "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1
}
if cuda_torch_ok; then
  log "reusing $VENV ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
else
  log "creating $VENV with torch==$TORCH_VERSION (CUDA build; a few GB, ~2 min)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" \
    numpy setuptools wheel ninja
  cuda_torch_ok || { echo "[cuda-ext] $VENV holds no CUDA build of torch" >&2; exit 1; }
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check setuptools wheel ninja >/dev/null
export PATH="$VENV/bin:$PATH"  # ninja

# 2. Out-of-tree copy of the sources (no build products, no .git).
work=$(mktemp -d "${TMPDIR:-/tmp}/cbd_cuda_ext.XXXXXX")
if [ "$KEEP" = 1 ]; then log "keeping $work"; else trap 'rm -rf "$work"' EXIT; fi
src="$work/src"
mkdir -p "$src"
tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
  --exclude=./cbd_fast/_build_info.json --exclude='__pycache__' -cf - . | tar -C "$src" -xf -

# 3. Build (forced CUDA: fails loudly, naming CUDA_HOME, when the toolkit is missing).
log "building with CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
if ! (cd "$src" && "$VENV/bin/python" setup.py -q build_ext --inplace >"$work/build.log" 2>&1); then
  tail -n 80 "$work/build.log" >&2
  echo "[cuda-ext] FAILED: the CUDA extension does not build (log above)" >&2
  exit 1
fi
log "built in $(($(date +%s) - start)) s: $(cd "$src" && ls cbd_fast/_C*.so)"

# 4. Import it on this machine: the extension loads, the record says CUDA, the ops and their CUDA
#    kernels are registered (for every csrc/torch/<op>_cuda.cpp).
cd "$work"
PYTHONPATH="$src" "$VENV/bin/python" - "$src" <<'PY'
import glob
import os
import sys

import torch

import cbd_fast
from cbd_fast.ops import _ext

src = sys.argv[1]
assert os.path.dirname(cbd_fast.__file__) == os.path.join(src, "cbd_fast"), cbd_fast.__file__
mod = _ext.load()
assert mod is not None, f"import cbd_fast._C failed: {_ext.load_error()}"
record = cbd_fast.build_info()
assert record["cuda_compiled"] and "cuda" in record["backends_compiled"], record
assert record["torch_version"] == torch.__version__, (record["torch_version"], torch.__version__)
assert hasattr(torch.ops.cbd_fast, "nt_xent_fwd"), "torch.ops.cbd_fast.nt_xent_fwd is not registered"
ops = [name for name in ("nt_xent_fwd", "nt_xent_bwd", "pgd_step_") if hasattr(torch.ops.cbd_fast, name)]
has = torch._C._dispatch_has_kernel_for_dispatch_key
keys = {op: [k for k in ("CPU", "CUDA", "Meta") if has(f"cbd_fast::{op}", k)] for op in ops}
missing = []
for glue in sorted(glob.glob(os.path.join(src, "csrc", "torch", "*_cuda.cpp"))):
    prefix = os.path.basename(glue)[: -len("_cuda.cpp")]
    if not any(op.startswith(prefix) and "CUDA" in k for op, k in keys.items()):
        missing.append(os.path.basename(glue))
print(f"[cuda-ext] imported cbd_fast._C with torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"archs {record['cuda_archs']}, kernels per op: {keys}")
assert not missing, f"{missing} registered no CUDA kernel for its op"
# has_cuda() asks the dispatcher: True for every op here, as the cuda backend needs
assert all(_ext.has_cuda(op) for op in _ext.NATIVE_OPS) and _ext.has_cuda(), "has_cuda() is False"
print(f"[cuda-ext] has_cuda(): {[(op, _ext.has_cuda(op)) for op in _ext.NATIVE_OPS]}")
PY
log "ok"
