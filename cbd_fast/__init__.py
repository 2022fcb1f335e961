"""cbd_fast: label-free backdoor purification of vision backbones (Contrastive Backdoor Defense).

Lean by design: importing the package loads neither the compiled extension nor Triton nor CUDA.
Heavy parts are imported on first attribute access.

Example:
    >>> from cbd_fast import purify                                   # doctest: +SKIP
    >>> clean_backbone = purify(backbone, unlabeled_images, epochs=5)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cbd_fast.ops.backends import available_backends

__version__ = "0.1.0"

# Eager (torch-only, no Triton/extension/CUDA): the submodule cbd_fast.purify shares its name with the
# function; importing it here first binds the name to the function for good (a lazy import would let
# Python's import system rebind cbd_fast.purify to the submodule).
from cbd_fast.core.purify import Purifier, PurifyResult, purify  # noqa: E402

# public name -> module that defines it (imported lazily on first access)
_LAZY = {
    "PurifyConfig": "cbd_fast.core.config",
    "NTXentLoss": "cbd_fast.ops.losses",
    "ops": "cbd_fast.ops",
    "attack": "cbd_fast.core.attack",
    "build_info": "cbd_fast.ops.build_info",
}

__all__ = ["__version__", "available_backends", "purify", "Purifier", "PurifyResult", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover  (names re-exported lazily through __all__ / __getattr__)
    from cbd_fast import ops  # noqa: F401
    from cbd_fast.core import attack  # noqa: F401
    from cbd_fast.core.config import PurifyConfig  # noqa: F401
    from cbd_fast.ops.build_info import build_info  # noqa: F401
    from cbd_fast.ops.losses import NTXentLoss  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbd_fast' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
