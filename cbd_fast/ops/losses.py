"""Loss modules: ``NTXentLoss``, the ``nn.Module`` face of ``cbd_fast.ops.nt_xent``."""

from __future__ import annotations

import torch
from torch import nn

from cbd_fast.ops.nt_xent import check_nt_xent_args, nt_xent

__all__ = ["NTXentLoss"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss over two views (fused; see ``cbd_fast.ops.nt_xent``).

    Args:
        temperature: tau, finite and > 0 (default 0.5, SimCLR's and CBD's).
        backend: "cuda", "triton", "cpp", "torch" or None (automatic; ``CBD_FAST_BACKEND``
            overrides).

    Shape:
        ``forward(a, b)``: ``a``, ``b`` [N, D] (N >= 2), float32/bfloat16/float16/float64; row
        ``i`` of ``b`` is the positive of row ``i`` of ``a``. Returns a 0-dim float32 tensor
        (float64 for float64 inputs).

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss = loss_fn(torch.randn(8, 16), torch.randn(8, 16))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.5, *, backend: str | None = None) -> None:
        super().__init__()
        probe = torch.zeros(2, 1)
        self.temperature = check_nt_xent_args(probe, probe, temperature)
        self.backend = backend

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return nt_xent(a, b, self.temperature, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}" + (f", backend={self.backend!r}" if self.backend else "")
