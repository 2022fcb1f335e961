"""Differentiable image transforms the universal adversaries search over.

Every function takes images ``x`` [n, C, H, W] (float, values in [0, 1]) and parameters shared by
all the images, and returns new images of ``x``'s shape and dtype, clamped to [0, 1]; gradients
flow to the parameters (and to ``x``). The parameters are bounded by their callers (projections
below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "upsample",
    "warp_images",
    "mask_blend",
    "project_area",
    "sparse_step",
    "tone_map",
    "additive",
]


def upsample(field: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[1, K, g1, g2] control values -> [1, K, h, w] by bicubic interpolation (corners aligned)."""
    return F.interpolate(field.float(), size=(h, w), mode="bicubic", align_corners=True)


def warp_images(x: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` at ``identity + displacement`` (bilinear, border padding).

    Args:
        x: [n, C, H, W] images.
        displacement: [1, 2, H, W] float32 displacements in PIXELS (channel 0: x / columns,
            channel 1: y / rows), shared by the images.

    Returns:
        [n, C, H, W] warped images in x's dtype.
    """
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=x.device),
        torch.linspace(-1, 1, w, device=x.device),
        indexing="ij",
    )
    identity = torch.stack([xs, ys], -1)[None]
    # one pixel in normalised coordinates (align_corners=True: the corner pixels sit at -1 and 1)
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=x.device)
    grid = (identity + displacement.permute(0, 2, 3, 1) * scale).clamp(-1, 1).expand(n, h, w, 2)
    out = F.grid_sample(x.float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(x.dtype)


def mask_blend(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``x + mask * (pattern - x)``: paste ``pattern`` where ``mask`` is 1 (Neural-Cleanse form).

    Args:
        x: [n, C, H, W] images.
        mask: [1, 1, H, W] in [0, 1].
        pattern: [1, C, H, W] in [0, 1].
    """
    xf = x.float()
    return (xf + mask * (pattern - xf)).clamp(0.0, 1.0).to(x.dtype)


@torch.no_grad()
def project_area(mask: torch.Tensor, budget: float, iterations: int = 40) -> torch.Tensor:
    """Euclidean projection of ``mask`` onto ``{0 <= m <= 1, sum(m) <= budget}``.

    The projection is ``clamp(m - theta, 0, 1)`` with the smallest ``theta >= 0`` that meets the
    budget; ``theta`` is found by bisection (the sum is monotone in it).

    Args:
        mask: any-shape float tensor.
        budget: the largest allowed sum (> 0), e.g. ``area * H * W``.
        iterations: bisection steps (theta to ``max(m) / 2**iterations``).
    """
    m = mask.clamp(0.0, 1.0)
    if float(m.sum()) <= budget:
        return m
    lo = torch.zeros((), device=m.device)
    hi = m.max().clone()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        over = (m - mid).clamp(0.0, 1.0).sum() > budget
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    return (m - hi).clamp(0.0, 1.0)


@torch.no_grad()
def sparse_step(
    x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, step: float, pixels: int
) -> torch.Tensor:
    """One ascent step of a per-image sparse perturbation, then its projection (in place on ``x_adv``).

    ``delta = x_adv - x`` moves along the gradient scaled so that each image's largest component moves
    by ``step`` (the magnitudes matter: they pick the pixels), is clamped so that ``x + delta`` stays in
    [0, 1], and is then cut to the ``pixels`` pixels (all channels of a position together) with the
    largest ``sum_c delta^2``: the Euclidean projection onto "at most ``pixels`` pixels changed"
    (Croce & Hein, "Sparse and Imperceivable Adversarial Attacks", ICCV 2019: PGD with an L0 ball).

    Args:
        x: [n, C, H, W] clean images (the centres).
        x_adv: [n, C, H, W] current adversarial images (updated in place and returned).
        grad: [n, C, H, W] gradient of the loss at ``x_adv``.
        step: the largest component's move per step (a fraction of the pixel range), > 0.
        pixels: the largest number of changed pixels per image, >= 1.
    """
    n, c, h, w = x.shape
    g = grad.float()
    scale = g.flatten(1).abs().amax(1).clamp_min(1e-12).view(n, 1, 1, 1)
    delta = (x_adv.float() + step * g / scale).clamp(0.0, 1.0) - x.float()
    energy = delta.pow(2).sum(1).flatten(1)  # [n, H*W]
    if pixels < h * w:
        keep = torch.zeros_like(energy, dtype=torch.bool)
        keep.scatter_(1, energy.topk(pixels, dim=1).indices, True)
        delta = delta * keep.view(n, 1, h, w)
    x_adv.copy_((x.float() + delta).to(x_adv.dtype))
    return x_adv


def tone_map(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """A per-channel tone curve: ``x + o_c(x)`` with ``o_c`` piecewise linear between K knots.

    Args:
        x: [n, C, H, W] images in [0, 1].
        offsets: [C, K] float32 offsets at the knots ``linspace(0, 1, K)`` (K >= 2); a one-row
            ``offsets`` [1, K] applies to every channel.

    Returns:
        [n, C, H, W] images in x's dtype, clamped to [0, 1].
    """
    n, c, h, w = x.shape
    k = offsets.shape[1]
    off = offsets.expand(c, k) if offsets.shape[0] == 1 else offsets
    xf = x.float().clamp(0.0, 1.0)
    pos = xf * (k - 1)
    i0 = pos.detach().floor().clamp(0, k - 2).long()
    frac = pos - i0
    # look-ups off[c, i0] and off[c, i0 + 1]: the gradient accumulates into a [C, K] tensor only
    ch = torch.arange(c, device=x.device).view(1, c, 1, 1).expand_as(i0)
    lo = off[ch, i0]
    hi = off[ch, i0 + 1]
    return (xf + lo + frac * (hi - lo)).clamp(0.0, 1.0).to(x.dtype)


def additive(
    x: torch.Tensor, field: torch.Tensor, bound: float, fine: torch.Tensor | None = None
) -> torch.Tensor:
    """``clamp(x + clamp(upsample(field) + fine, -bound, bound), 0, 1)``: a universal additive
    perturbation, smooth (``field``) plus full-resolution (``fine``).

    Args:
        x: [n, C, H, W] images.
        field: [1, C, g1, g2] control values, upsampled bicubically.
        bound: the L-inf bound of the dense perturbation (the clamp also removes bicubic overshoot).
        fine: optional [1, C, H, W] full-resolution part.
    """
    up = upsample(field, x.shape[-2], x.shape[-1])
    if fine is not None:
        up = up + fine.float()
    up = up.clamp(-bound, bound)
    return (x.float() + up).clamp(0.0, 1.0).to(x.dtype)
