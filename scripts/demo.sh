#!/usr/bin/env bash
# The main job: install everything (scripts/install.sh), then run the Fashion-MNIST demo
# (`cbd-fast demo`: purify a shipped backdoored backbone and report ACC/ASR before and after).
#
#   bash scripts/demo.sh [demo options...]      e.g. bash scripts/demo.sh --help
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}

bash "$ROOT/scripts/install.sh"
cd "$ROOT"
if [ ! -f "$ROOT/cbd_fast/__main__.py" ]; then
  "$PY" -m cbd_fast.info
  echo "demo.sh: this checkout has no command line yet (cbd_fast/__main__.py); the install above worked" >&2
  exit 1
fi
# `python -m cbd_fast` is `cbd-fast` without depending on pip's script folder being on PATH.
exec "$PY" -m cbd_fast demo "$@"
