#!/usr/bin/env bash
# Install what cbd_fast needs on a Debian/Ubuntu machine, then the project itself (editable, with
# its compiled extension). Idempotent: what is already there is kept.
#
#   bash scripts/install.sh            # runtime: Fashion-MNIST package, torch, triton, cbd_fast
#   bash scripts/install.sh --test     # + test extras, cmake and a C++ compiler for ctest, and
#                                      #   chromium (renders report.html in a test)
#
# Environment:
#   PYTHON=python3                 the interpreter to install into (a venv's python works)
#   CBD_FAST_TORCH_VERSION=2.13.0  the CPU torch installed when no torch is importable; an existing
#                                  torch (CPU or CUDA) is never replaced
#   CBD_FAST_BUILD_LOCK=PATH       serialise the extension build with flock on PATH (shared hosts)
#   CBD_FAST_REBUILD=1             rebuild even when the installed extension is up to date
#   plus setup.py's build flags (CBD_FAST_SKIP_EXT, CBD_FAST_NO_CUDA, ...; see setup.py)
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TORCH_VERSION=${CBD_FAST_TORCH_VERSION:-2.13.0}
WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "install.sh: unknown argument: $arg (expected --test)" >&2; exit 2 ;;
  esac
done

log() { echo "[install] $*"; }
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
have_py_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# 1. System packages: the Fashion-MNIST data set (Debian's dataset-fashion-mnist, for the demo)
#    and, for the tests, cmake and a C++ compiler (the C++ unit tests of the kernel cores) and
#    Chromium (tests/app/test_html_report.py screenshots report.html headless).
apt_pkgs=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt_pkgs+=(dataset-fashion-mnist)
command -v g++ >/dev/null 2>&1 || apt_pkgs+=(g++)
if [ "$WITH_TEST" = 1 ]; then
  command -v cmake >/dev/null 2>&1 || apt_pkgs+=(cmake)
  command -v make >/dev/null 2>&1 || apt_pkgs+=(make)
  command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  log "apt-get install ${apt_pkgs[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

# 2. torch: keep whatever torch is importable (a CUDA build on a GPU machine); else a pinned CPU build
#    (an unpinned `pip install torch` would pull the 5.5 GB CUDA build).
torch_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ -n "$torch_version" ] && have_py_module torch; then
  log "torch $torch_version already installed"
else
  log "installing CPU torch==$TORCH_VERSION"
  if ! pip_install "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
    pip_install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

# 3. Build prerequisites (the build runs without isolation, against the torch installed above),
#    Triton (skipped when present: CUDA builds of torch pin their own), and the project.
"$PY" -c 'import sys, setuptools, wheel, ninja, numpy; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' \
  >/dev/null 2>&1 || pip_install "setuptools>=64" wheel ninja numpy
"$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("triton") is None)' \
  || { log "installing triton"; pip_install triton; }
# pip puts ninja in the interpreter's script folder; torch's build finds it on PATH (else it falls
# back to a serial build).
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
extras="triton,report,io"
[ "$WITH_TEST" = 1 ] && extras="$extras,test"

# Skip the (minutes-long) build when this checkout is already installed and its extension is newer
# than every source, built against the torch installed now. CBD_FAST_REBUILD=1 forces it.
up_to_date() {
  [ "${CBD_FAST_REBUILD:-0}" = 1 ] && return 1
  local so
  so=$(ls "$ROOT"/cbd_fast/_C*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] || return 1
  [ -z "$(find "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/pyproject.toml" -type f -newer "$so" 2>/dev/null | head -n 1)" ] \
    || return 1
  (cd / && "$PY" - "$ROOT" "$WITH_TEST" <<'PY') >/dev/null 2>&1
import importlib.metadata, importlib.util, json, os, sys
root, with_test = sys.argv[1], sys.argv[2] == "1"
spec = importlib.util.find_spec("cbd_fast")  # finds, does not import (no torch import: fast)
assert spec is not None and os.path.realpath(os.path.dirname(spec.origin)) == os.path.realpath(os.path.join(root, "cbd_fast"))
with open(os.path.join(root, "cbd_fast", "_build_info.json")) as f:
    record = json.load(f)
assert record.get("extension_built") and record.get("torch_version") == importlib.metadata.version("torch")
for mod in ["tqdm", "numpy", "matplotlib", "PIL", "yaml", "safetensors"] + (["pytest", "pytest_benchmark", "hypothesis"] if with_test else []):
    assert importlib.util.find_spec(mod) is not None, mod
PY
}
if up_to_date; then
  log "cbd_fast is installed from $ROOT and its extension is up to date (CBD_FAST_REBUILD=1 rebuilds)"
  exit 0
fi

log "building and installing cbd_fast[$extras] from $ROOT (editable; compiles cbd_fast._C)"
build=("$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e "$ROOT[$extras]")
if [ -n "${CBD_FAST_BUILD_LOCK:-}" ] && command -v flock >/dev/null 2>&1; then
  build=(flock "$CBD_FAST_BUILD_LOCK" "${build[@]}")
fi
if ! build_log=$("${build[@]}" 2>&1); then
  echo "$build_log" >&2
  echo "[install] building cbd_fast failed (see above); CBD_FAST_SKIP_EXT=1 installs without the extension" >&2
  exit 1
fi
(cd / && "$PY" -c 'import cbd_fast.ops.build_info as b; r = b.build_info(); print("[install] built:", ", ".join(r["backends_compiled"]) or "no extension", "| torch", r.get("torch_version"))')
