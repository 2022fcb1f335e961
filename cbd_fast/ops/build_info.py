"""The build record written by setup.py into ``cbd_fast/_build_info.json``.

Keys: ``version``, ``python``, ``torch_version``, ``cuda_version`` (torch's CUDA, or None),
``cuda_archs`` (list of "9.0"-style strings), ``extension_built`` (bool), ``cuda_compiled``
(bool), ``cuda_reason`` (why CUDA was or was not compiled), ``backends_compiled`` (list of
"cpp"/"cuda"), ``build_time`` (ISO 8601), ``flags`` (the build's CBD_FAST_* and CUDA variables).
An install without a record (a source checkout that was never built) gets
``{"extension_built": False, "cuda_compiled": False, "backends_compiled": [], "note": ...}``.

Both ``cbd_fast.ops.build_info()`` and ``cbd_fast.ops.build_info.build_info()`` work: the package
attribute ``cbd_fast.ops.build_info`` is this module (Python binds a submodule to its package's
attribute on import), so the module is made callable.

Example:
    >>> import cbd_fast
    >>> cbd_fast.ops.build_info()["backends_compiled"]  # doctest: +SKIP
    ['cpp']
"""

from __future__ import annotations

import copy
import json
import sys
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["build_info"]

_PATH = Path(__file__).resolve().parent.parent / "_build_info.json"  # written by setup.py


@lru_cache(maxsize=1)
def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {
            "extension_built": False,
            "cuda_compiled": False,
            "backends_compiled": [],
            "note": f"no build record at {path}: package not built with setup.py",
        }
    except (OSError, ValueError) as exc:
        return {
            "extension_built": False,
            "cuda_compiled": False,
            "backends_compiled": [],
            "note": f"unreadable build record {path}: {exc}",
        }


def build_info() -> dict[str, Any]:
    """The build record as a fresh dict (read once per process; callers may mutate their copy).

    Returns:
        The record's keys as listed in the module docstring.
    """
    return copy.deepcopy(_read(_PATH))


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict[str, Any]:
        return build_info()


sys.modules[__name__].__class__ = _CallableModule
