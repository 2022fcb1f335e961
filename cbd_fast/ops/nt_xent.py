"""NT-Xent op (placeholder: reference only; the fused backends replace this)."""

from __future__ import annotations

import torch

from cbd_fast.reference import nt_xent_reference


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5, *,
            backend: str | None = None) -> torch.Tensor:
    return nt_xent_reference(a, b, temperature)
