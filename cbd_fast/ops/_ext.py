"""Load the compiled extension ``cbd_fast._C`` once, lazily; remember why not if it fails.

Importing this module does nothing. ``load()`` imports the extension on first use, which
registers the ``torch.ops.cbd_fast.*`` C++/CUDA ops. A missing or broken extension never
raises here: the error text is kept for ``python -m cbd_fast.info`` and for the message of a
backend asked for by name.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["load", "load_error", "has_cuda"]

_state: dict[str, object] = {}


def load() -> ModuleType | None:
    """The extension module, or None if it is not built/importable (see ``load_error``)."""
    if "module" not in _state:
        if os.environ.get("CBD_FAST_DISABLE_EXT", "0").strip().lower() not in ("", "0", "false", "no"):
            _state["module"] = None
            _state["error"] = "disabled by CBD_FAST_DISABLE_EXT=1"
        else:
            try:
                import torch  # noqa: F401  (the extension's symbols need torch loaded first)

                _state["module"] = importlib.import_module("cbd_fast._C")
                _state["error"] = None
            except Exception as exc:  # ImportError, OSError (undefined symbol), ...
                _state["module"] = None
                _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["module"]  # type: ignore[return-value]


def load_error() -> str | None:
    """Why the extension could not be loaded, or None when it loaded."""
    load()
    return _state["error"]  # type: ignore[return-value]


def has_cuda() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels."""
    mod = load()
    if mod is None:
        return False
    if "cuda" not in _state:  # the build record is read (and copied) once, not on every op call
        from cbd_fast.ops.build_info import build_info

        _state["cuda"] = bool(build_info().get("cuda_compiled", False))
    return bool(_state["cuda"])
