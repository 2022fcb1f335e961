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

__all__ = ["load", "load_error", "cpu_isa", "has_cuda", "has_kernel", "NATIVE_OPS"]

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


def cpu_isa() -> str | None:
    """The instruction set the compiled CPU NT-Xent kernel runs with here (``"avx512"``, ``"avx2"``
    or ``"baseline"``: each has its own register tile), or None without the extension."""
    module = load()
    return None if module is None else getattr(module, "cpu_isa", None)


#: The native ops behind each public op, as registered by the extension (csrc/torch/ops.cpp).
NATIVE_OPS: dict[str, tuple[str, ...]] = {
    "nt_xent": ("cbd_fast::nt_xent_fwd", "cbd_fast::nt_xent_bwd"),
    "pgd_step": ("cbd_fast::pgd_step_",),
}


def has_kernel(qualname: str, dispatch_key: str = "CUDA") -> bool:
    """Whether the torch dispatcher holds a kernel of op ``qualname`` for ``dispatch_key``.

    Asks the dispatcher itself (``torch._C._dispatch_has_kernel_for_dispatch_key``), so the answer
    reflects what was really registered when the extension was imported, not what the build record
    claims. A kernel registered for that key only counts (no fallthrough, no composite alias).

    Args:
        qualname: ``"namespace::op"``, e.g. ``"cbd_fast::nt_xent_fwd"``.
        dispatch_key: a dispatch key name, e.g. ``"CUDA"`` or ``"CPU"``.

    Returns:
        False as well when the op does not exist.
    """
    import torch

    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key))
    except RuntimeError:  # "operator ... does not exist"
        return False


def has_cuda(op: str | None = None) -> bool:
    """True when the loaded extension registered CUDA kernels (for ``op``'s native ops, or all).

    The dispatcher is asked (see ``has_kernel``), not the build record: a record that says
    ``cuda_compiled`` beside an extension whose CUDA kernels did not register (a stale or mixed
    build, a CUDA glue file left out) answers False here.

    Args:
        op: "nt_xent" or "pgd_step" (keys of ``NATIVE_OPS``), or None for every op of the extension.

    Returns:
        False when the extension is not loaded.
    """
    if load() is None:
        return False
    if op is not None and op not in NATIVE_OPS:
        raise ValueError(f"op must be one of {sorted(NATIVE_OPS)} or None; got {op!r}")
    cache = _state.setdefault("cuda_ops", {})  # registrations happen at import only: ask once per op
    names = NATIVE_OPS[op] if op is not None else tuple(q for qs in NATIVE_OPS.values() for q in qs)
    for qualname in names:
        if qualname not in cache:
            cache[qualname] = has_kernel(qualname, "CUDA")
    return all(cache[q] for q in names)
