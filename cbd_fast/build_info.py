"""The build record written by setup.py into ``cbd_fast/_build_info.json``.

Keys: ``version``, ``torch_version``, ``cuda_version`` (torch's CUDA, or None),
``cuda_archs`` (list of "9.0"-style strings), ``extension_built`` (bool), ``cuda_compiled``
(bool), ``backends_compiled`` (list of "cpp"/"cuda"), ``build_time`` (ISO 8601), ``flags``.
An install without a record (a source checkout that was never built) gets ``{"extension_built":
False, "note": ...}``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

__all__ = ["build_info"]

_PATH = Path(__file__).with_name("_build_info.json")


@lru_cache(maxsize=1)
def build_info() -> dict:
    """The build record as a dict (a copy is cheap; do not mutate the cached one)."""
    try:
        return json.loads(_PATH.read_text())
    except FileNotFoundError:
        return {"extension_built": False, "cuda_compiled": False, "backends_compiled": [],
                "note": f"no build record at {_PATH}: package not built with setup.py"}
    except (OSError, ValueError) as exc:
        return {"extension_built": False, "cuda_compiled": False, "backends_compiled": [],
                "note": f"unreadable build record {_PATH}: {exc}"}
