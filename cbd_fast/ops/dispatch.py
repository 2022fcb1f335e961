"""Argument checks and backend dispatch shared by the op modules (``ops/nt_xent.py``, ``ops/pgd.py``).

Private to ``cbd_fast.ops``: each op keeps its own public signature and error texts, these helpers
only hold the logic the ops have in common.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from cbd_fast.ops.backends import candidate_backends

__all__ = [
    "FLOAT_DTYPES",
    "BACKEND_DTYPES",
    "check_float_tensor",
    "check_real",
    "select_op_backend",
    "op_backend_candidates",
    "check_backend_dtype",
    "register_fake_once",
]

#: Every storage dtype the ops accept (the torch reference and cpp serve them all).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: Storage dtypes each backend serves.
BACKEND_DTYPES = {
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cpp": FLOAT_DTYPES,
    "torch": FLOAT_DTYPES,
}


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    """Return ``t`` when it is a tensor of one of ``FLOAT_DTYPES``.

    Args:
        name: the argument's name, for the error message.
        t: the value passed for it.

    Raises:
        TypeError: ``t`` is not a tensor, or not of a float dtype (the message names both).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32, bfloat16, float16 or float64 tensor; got {t.dtype}")
    return t


def check_real(name: str, value: object, *, kinds: str = "") -> float:
    """Return ``value`` as a Python float when it is a real number (``bool`` is refused).

    Args:
        name: the argument's name, for the error message.
        value: the value passed for it.
        kinds: text inserted after "a real number" in the message, e.g. ``" (int or float)"``.

    Raises:
        TypeError: ``value`` is not a real number (the message names the argument, type and value).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{kinds}; got {type(value).__name__} {value!r}")
    return float(value)


def op_backend_candidates(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None,
    gpu_order: tuple[str, ...],
    cpu_order: tuple[str, ...] = ("cpp", "torch"),
) -> tuple[list[str], bool]:
    """The backends to try for ``op``, in order, and whether the caller named one.

    float64 (when no backend is named) goes to cpp or torch on CPU and torch on CUDA; other dtypes
    try ``gpu_order`` on CUDA and ``cpu_order`` (cpp, torch) on CPU. Backends that failed to
    compile or launch for (op, device type, dtype) earlier in this process are left out
    (``backends.run_with_fallback``).

    Args:
        op: the op's name, e.g. "pgd_step" (for messages and the failure records).
        device: the tensors' device.
        dtype: their storage dtype.
        backend: the backend the caller named, or None (automatic; ``CBD_FAST_BACKEND`` overrides).
        gpu_order: the op's preferred order of backends for CUDA tensors.
        cpu_order: the order for CPU tensors.

    Returns:
        ``(names, named)`` as ``cbd_fast.ops.backends.candidate_backends``. Raises RuntimeError
        when a named backend cannot serve the tensors.
    """
    if backend is None and dtype == torch.float64:
        priority = ("cpp", "torch") if device.type == "cpu" else ("torch",)
    else:
        priority = gpu_order if device.type == "cuda" else cpu_order
    return candidate_backends(op, device, backend, priority=priority, dtype=dtype)


def select_op_backend(
    op: str, device: torch.device, dtype: torch.dtype, backend: str | None, gpu_order: tuple[str, ...]
) -> str:
    """The first of ``op_backend_candidates`` (see there): the backend an op call starts with."""
    return op_backend_candidates(op, device, dtype, backend, gpu_order)[0][0]


def check_backend_dtype(op: str, name: str, arg: str, dtype: torch.dtype) -> None:
    """Refuse a tensor dtype that backend ``name`` does not serve.

    Args:
        op: the op's name, e.g. "nt_xent".
        name: the chosen backend.
        arg: the name of the tensor argument whose dtype is checked.
        dtype: its dtype.

    Raises:
        TypeError: ``dtype`` is not in ``BACKEND_DTYPES[name]``.
    """
    if dtype not in BACKEND_DTYPES[name]:
        raise TypeError(
            f"{op}: backend {name!r} serves {[str(d) for d in BACKEND_DTYPES[name]]} tensors; "
            f"got {arg} of dtype {dtype} (use backend='cpp', 'torch' or None)"
        )


def register_fake_once(name: str, fn: Callable) -> None:
    """Register ``fn`` as the fake (meta) implementation of op ``name``; keep an earlier one if any."""
    try:
        torch.library.register_fake(name)(fn)
    except RuntimeError as exc:  # registered already (e.g. a module reload): keep the first one
        if "already" not in str(exc):
            raise
