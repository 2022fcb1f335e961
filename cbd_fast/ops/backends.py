"""Backend discovery and dispatch rules shared by every op.

Backends, fastest first where they apply:

- ``cuda``:   the compiled extension's CUDA kernels (``cbd_fast._C``), CUDA tensors only.
- ``triton``: Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` is set.
- ``cpp``:    the compiled extension's C++ CPU kernels, CPU tensors only.
- ``torch``:  the pure-PyTorch reference (``cbd_fast.ops.reference``), any device, always there.

Rules (Liger-Kernel's): ``backend=None`` picks automatically (the ``CBD_FAST_BACKEND``
environment variable overrides it) and falls back quietly, logging the reason at debug level;
a backend asked for by name that cannot serve raises a ``RuntimeError`` naming it and why.
Nothing here initialises CUDA or imports Triton at ``import cbd_fast`` time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "available_backends",
    "backend_status",
    "select_backend",
    "triton_interpret",
]

logger = logging.getLogger("cbd_fast.ops.backends")

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpp", "torch")
ENV_VAR = "CBD_FAST_BACKEND"


def triton_interpret() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``): kernels run on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def _cuda_reason(dev: str) -> str | None:
    if dev != "cuda":
        return f"serves CUDA tensors only, not {dev!r} tensors"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


_TRITON_SPEC: dict[object, bool] = {}


def _triton_installed() -> bool:
    """Whether the triton package is importable, looked up once per process.

    ``find_spec`` costs ~0.2 ms and the ops ask on every call (13 times per CBD step), so the answer
    is cached, keyed by the ``find_spec`` function itself so a test that patches it is still obeyed.
    """
    finder = importlib.util.find_spec
    if finder not in _TRITON_SPEC:
        _TRITON_SPEC[finder] = finder("triton") is not None
    return _TRITON_SPEC[finder]


def backend_status(device: str | torch.device | None = "cpu") -> dict[str, str | None]:
    """For each backend, ``None`` if it can serve tensors on ``device``, else the reason why not.

    Args:
        device: a device or device string ("cpu", "cuda", "cuda:1", ...).

    Returns:
        ``{"cuda": reason_or_None, "triton": ..., "cpp": ..., "torch": None}``, in BACKENDS order.
    """
    from cbd_fast.ops import _ext  # local: keeps `import cbd_fast` free of the extension load

    dev = _device_type(device)
    status: dict[str, str | None] = {}

    # cuda: needs the extension, CUDA kernels compiled into it, and a CUDA device.
    ext_err = _ext.load_error()
    if ext_err is not None:
        status["cuda"] = f"compiled extension not loaded: {ext_err}"
    elif not _ext.has_cuda():
        status["cuda"] = "the compiled extension was built without CUDA kernels"
    else:
        status["cuda"] = _cuda_reason(dev)

    # triton: needs the package; CUDA tensors, or CPU tensors under the interpreter.
    if not _triton_installed():
        status["triton"] = "the triton package is not installed"
    elif dev == "cpu":
        status["triton"] = None if triton_interpret() else "CPU tensors need TRITON_INTERPRET=1 (interpreter)"
    elif dev == "cuda":
        status["triton"] = None if torch.cuda.is_available() else _cuda_reason(dev)
    else:
        status["triton"] = f"does not serve {dev!r} tensors"

    # cpp: needs the extension; CPU tensors only.
    if ext_err is not None:
        status["cpp"] = f"compiled extension not loaded: {ext_err}"
    elif dev != "cpu":
        status["cpp"] = f"serves CPU tensors only, not {dev!r} tensors"
    else:
        status["cpp"] = None

    status["torch"] = None
    return status


def available_backends(device: str | torch.device | None = "cpu") -> list[str]:
    """Names of the op backends usable for tensors on ``device``, in BACKENDS order.

    Example:
        >>> import cbd_fast
        >>> cbd_fast.available_backends("cpu")  # doctest: +SKIP
        ['cpp', 'torch']
    """
    return [name for name, reason in backend_status(device).items() if reason is None]


def select_backend(
    op: str,
    device: str | torch.device,
    requested: str | None = None,
    priority: Sequence[str] | None = None,
) -> str:
    """Resolve which backend runs ``op`` on tensors living on ``device``.

    Args:
        op: op name, used in messages only ("nt_xent", "pgd_step").
        device: where the op's tensors live.
        requested: a backend name, or None for automatic. ``CBD_FAST_BACKEND`` replaces None.
        priority: automatic order for this op and device; defaults to ("cuda", "triton", "cpp",
            "torch") on CUDA and ("cpp", "torch") on CPU (the Triton interpreter is never picked
            automatically: it is a test vehicle, not a fast path).

    Returns:
        The backend name.

    Raises:
        ValueError: ``requested`` (or the environment variable) is not a backend name.
        RuntimeError: a backend asked for by name cannot serve these tensors; says why.
    """
    source = "backend"
    if requested is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            requested, source = env, f"{ENV_VAR} environment variable"
    if requested is not None:
        if not isinstance(requested, str) or requested.lower() not in BACKENDS:
            raise ValueError(f"{source} must be one of {list(BACKENDS)} or None; got {requested!r}")
        requested = requested.lower()
        reason = backend_status(device)[requested]
        if reason is not None:
            raise RuntimeError(
                f"{op}: backend {requested!r} (from {source}) cannot serve tensors on "
                f"{torch.device(device)}: {reason}"
            )
        return requested

    dev = _device_type(device)
    if priority is None:
        priority = ("cuda", "triton", "cpp", "torch") if dev == "cuda" else ("cpp", "torch")
    unknown = [name for name in priority if name not in BACKENDS]
    if unknown:
        raise ValueError(f"priority must name backends from {list(BACKENDS)}; got {list(priority)!r}")
    status = backend_status(device)
    for name in priority:
        if status[name] is None:
            return name
        logger.debug("%s: skipping backend %r on %s: %s", op, name, dev, status[name])
    return "torch"
