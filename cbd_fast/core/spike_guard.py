"""The gradient spike guard: a step whose gradient norm jumps far above the recent ones is scaled down.

``n = ||g||_2`` over every trainable parameter; ``c = min(1, factor * ema / n)``; ``g <- c g``;
``ema <- 0.9 ema + 0.1 c n``. The first :data:`WARMUP` steps only measure (``ema`` is their mean):
the first step's gradient is small by construction (the encoder still equals the frozen original),
so a limit taken from it alone would clip ordinary steps. Everything stays on the device (no host
sync); a multiplication by exactly 1 leaves the gradients bit-identical, so a run whose norms never
spike is the unguarded run. Non-finite norms are left to the loop's ``nonfinite`` policy and do not
enter the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SpikeGuard", "WARMUP"]

#: steps that only measure the norm before the guard may clip
WARMUP = 3
#: weight of the newest (possibly clipped) norm in the running mean
_EMA_NEW = 0.1


class SpikeGuard:
    """Scales a gradient down to ``factor`` times the running mean of earlier gradient norms.

    Args:
        factor: the allowed multiple of the running mean (> 0), or None: the guard is off.
        device: where the running mean lives (the gradients' device).
    """

    def __init__(self, factor: float | None, device: torch.device) -> None:
        self.factor = factor
        self.device = device
        self.ema: torch.Tensor | None = None  # 0-d float32: running mean of gradient norms
        self.steps = 0

    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Clip ``grads`` in place when they spike.

        Args:
            grads: the step's parameter gradients (any float dtypes, one device).

        Returns:
            a 0-d float32 tensor on the device: 1.0 when this step was scaled down, else 0.0.
        """
        zero = torch.zeros((), device=self.device)
        if self.factor is None or not grads:
            return zero
        # one fused pass where every gradient shares a device and dtype (as clip_grad_norm_ does)
        foreach = hasattr(torch, "_foreach_norm") and len({(g.device, g.dtype) for g in grads}) == 1
        if foreach:
            norms = [n.float() for n in torch._foreach_norm(list(grads))]
        else:
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        ok = torch.isfinite(norm)
        self.steps += 1
        if self.ema is None or self.steps <= WARMUP:
            # 1. warm-up: a plain mean of the first norms, no clipping
            prev = torch.zeros_like(norm) if self.ema is None else self.ema
            k = min(self.steps, WARMUP)
            self.ema = torch.where(ok, prev + (norm - prev) / k, prev)
            return zero
        # 2. c = min(1, factor * ema / n): exactly 1 unless clipped
        ema = self.ema
        limit = torch.where(ema > 0, self.factor * ema, torch.full_like(ema, float("inf")))
        c = torch.where(ok & (norm > limit), limit / norm.clamp_min(1e-30), torch.ones_like(norm))
        if foreach:
            torch._foreach_mul_(list(grads), c.to(grads[0].dtype))
        else:
            for g in grads:
                g.mul_(c.to(g.dtype))
        # 3. the running mean of the norms actually applied
        self.ema = torch.where(ok, (1 - _EMA_NEW) * ema + _EMA_NEW * c * norm, ema)
        return (c < 1).float()

    def state_dict(self) -> dict[str, Any]:
        """``grad_ema`` (0-d CPU tensor or None) and ``grad_steps``: what a checkpoint keeps."""
        return {"grad_ema": None if self.ema is None else self.ema.detach().cpu(), "grad_steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a missing ``grad_steps`` means past the warm-up)."""
        ema = state.get("grad_ema")
        self.ema = None if ema is None else ema.to(self.device)
        self.steps = int(state.get("grad_steps", 0 if ema is None else WARMUP))
