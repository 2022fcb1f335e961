#!/usr/bin/env bash
# Install what cbd_fast needs on a Debian/Ubuntu machine, then the project itself (editable, with
# its compiled extension). Idempotent: what is already there is kept.
#
#   bash scripts/install.sh            # runtime: Fashion-MNIST package, torch, triton, cbd_fast
#   bash scripts/install.sh --test     # + test extras, cmake and a C++ compiler for ctest
#
# Environment:
#   PYTHON=python3                 the interpreter to install into (a venv's python works)
#   CBD_FAST_TORCH_VERSION=2.13.0  the CPU torch installed when no torch is importable; an existing
#                                  torch (CPU or CUDA) is never replaced
#   CBD_FAST_BUILD_LOCK=PATH       serialise the extension build with flock on PATH (shared hosts)
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
#    and, for the tests, cmake and a C++ compiler (the C++ unit tests of the kernel cores).
apt_pkgs=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt_pkgs+=(dataset-fashion-mnist)
command -v g++ >/dev/null 2>&1 || apt_pkgs+=(g++)
if [ "$WITH_TEST" = 1 ]; then
  command -v cmake >/dev/null 2>&1 || apt_pkgs+=(cmake)
  command -v make >/dev/null 2>&1 || apt_pkgs+=(make)
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
if have_py_module torch; then
  log "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
else
  log "installing CPU torch==$TORCH_VERSION"
  if ! pip_install "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
    pip_install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

# 3. Build prerequisites (the build runs without isolation, against the torch installed above),
#    Triton (skipped when present: CUDA builds of torch pin their own), and the project.
pip_install "setuptools>=64" wheel ninja numpy
have_py_module triton || { log "installing triton"; pip_install triton; }
extras="triton,report,io"
[ "$WITH_TEST" = 1 ] && extras="$extras,test"

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
"$PY" -c 'import cbd_fast.build_info as b; r = b.build_info(); print("[install] built:", ", ".join(r["backends_compiled"]) or "no extension", "| torch", r.get("torch_version"))'
