"""Everything below the op boundary: the fused ops, backend discovery and dispatch, the pure-PyTorch
reference, the compiled extension's loader and its build record.

One module per op: ``nt_xent`` / ``nt_xent_value_and_grad`` (``ops/nt_xent.py``), ``pgd_init`` /
``pgd_step`` (``ops/pgd.py``), ``NTXentLoss`` (``ops/losses.py``). The op modules register
``torch.library`` ops when first imported, so they load on first attribute access: importing
``cbd_fast.ops.backends`` stays cheap.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_LAZY = {
    "nt_xent": "cbd_fast.ops.nt_xent",
    "nt_xent_value_and_grad": "cbd_fast.ops.nt_xent",
    "pgd_init": "cbd_fast.ops.pgd",
    "pgd_step": "cbd_fast.ops.pgd",
    "NTXentLoss": "cbd_fast.ops.losses",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from cbd_fast.ops.losses import NTXentLoss  # noqa: F401
    from cbd_fast.ops.nt_xent import nt_xent, nt_xent_value_and_grad  # noqa: F401
    from cbd_fast.ops.pgd import pgd_init, pgd_step  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbd_fast.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _OpsPackage(types.ModuleType):
    """Keeps ``cbd_fast.ops.nt_xent`` the function: the import system binds every submodule onto its
    package once imported, and the op modules share their functions' names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # resolved to the function by __getattr__ on next access
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _OpsPackage
