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

# public name -> module that defines it (imported lazily on first access); the names in _MODULES
# are the modules themselves
_MODULES = frozenset({"ops", "attack"})
_LAZY = {
    "purify": "cbd_fast.core.purify",
    "Purifier": "cbd_fast.core.purify",
    "PurifyResult": "cbd_fast.core.purify",
    "PurifyConfig": "cbd_fast.core.config",
    "NTXentLoss": "cbd_fast.ops.losses",
    "ops": "cbd_fast.ops",
    "attack": "cbd_fast.core.attack",
    "build_info": "cbd_fast.ops.build_info",
}

__all__ = ["__version__", "available_backends", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover  (names re-exported lazily through __all__ / __getattr__)
    from cbd_fast import ops  # noqa: F401
    from cbd_fast.core import attack  # noqa: F401
    from cbd_fast.core.config import PurifyConfig  # noqa: F401
    from cbd_fast.core.purify import Purifier, PurifyResult, purify  # noqa: F401
    from cbd_fast.ops.build_info import build_info  # noqa: F401
    from cbd_fast.ops.losses import NTXentLoss  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbd_fast' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name in _MODULES else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
