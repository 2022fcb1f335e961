"""Device resolution: the one reading of ``device="auto" | "cpu" | "cuda" | "cuda:N"``."""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "module_device", "CUDAUnavailableError"]


class CUDAUnavailableError(ValueError):
    """A CUDA device was asked for where none is visible."""


def resolve_device(spec: str | torch.device | None, *, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` a run uses.

    Args:
        spec: ``"auto"`` or None (CUDA when available, else the CPU), or any torch device string.
        local_rank: in a distributed run, this process's GPU: ``"auto"`` and a bare ``"cuda"`` mean
            ``cuda:local_rank``. None: the current CUDA device.

    Raises:
        ValueError: ``spec`` is not a device string.
        CUDAUnavailableError: (a ValueError) ``spec`` names CUDA where none is available.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device must be 'auto' or a torch device string such as 'cpu', 'cuda:0'; got {spec!r}"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CUDAUnavailableError(f"device {str(spec)!r} was requested but CUDA is not available here")
        if dev.index is None and local_rank is not None:
            return torch.device("cuda", local_rank)
    return dev


def module_device(module: object) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for a module without tensors
    or for a plain callable."""
    if isinstance(module, torch.nn.Module):
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device("cpu")
