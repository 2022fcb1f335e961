"""Pure-PyTorch reference of every op: the executable specification and the last fallback.

Every other backend (cpp, triton, cuda) is tested against these functions. They are written
for clarity, not speed: ``nt_xent_reference`` materialises the full 2N x 2N score matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["nt_xent_reference", "pgd_step_reference", "pgd_init_reference", "opmath_dtype", "NORM_EPS"]

#: Rows are L2-normalised as ``x / max(||x||, NORM_EPS)`` (``F.normalize``): a zero row stays zero.
NORM_EPS = 1e-12


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in for tensors of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nt_xent_reference(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss over two views, exactly as ``docs/method.md`` (section 2) defines it.

    Args:
        a: [N, D] features of view one (any float dtype; computed in float32 or float64).
        b: [N, D] features of view two; row ``i`` of ``b`` is the positive of row ``i`` of ``a``.
        temperature: tau > 0.

    Returns:
        0-dim float32 tensor (float64 when the inputs are float64):
        ``(1/2N) * sum_i [ -s_{i,p(i)} + logsumexp_{j != i} s_ij ]`` with
        ``s_ij = <u_i, u_j> / tau``, ``u = [normalize(a); normalize(b)]`` and ``p(i) = i +- N``.
    """
    compute = opmath_dtype(a.dtype)
    n = a.shape[0]
    # 1. Cosine similarity: L2-normalise the 2N rows, then scaled dot products.
    #    The norms are taken in float64: the squares of float32 features beyond ~1e19 would overflow.
    u = torch.cat([a, b], dim=0).to(torch.float64)
    u = F.normalize(u, dim=1, eps=NORM_EPS).to(compute)
    s = (u @ u.T) / temperature
    # 2. Exclude self-similarity from the denominator.
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=s.device), float("-inf"))
    # 3. Positive of row i is its partner in the other view.
    pos_idx = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(s.device)
    pos = s.gather(1, pos_idx[:, None]).squeeze(1)
    return (torch.logsumexp(s, dim=1) - pos).mean()


def pgd_step_reference(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_clean: torch.Tensor,
    step_size: float,
    epsilon: float,
    lower: float = 0.0,
    upper: float = 1.0,
) -> torch.Tensor:
    """One signed-gradient ascent step, projected on the L-inf ball and the box, in place.

    ``x_adv <- clamp(clamp(x_adv + step_size * sign(grad), x_clean - epsilon,
    x_clean + epsilon), lower, upper)``, evaluated in float32 (float64 for float64 tensors)
    and rounded once to ``x_adv.dtype`` (round to nearest even). sign(0) = 0; a NaN in
    ``grad``, ``x_adv`` or ``x_clean`` gives NaN at that element (NaN propagates through the
    clamps), which the CBD loop's non-finite guard then reports.

    Args:
        x_adv: adversarial images, any shape, float32/bfloat16/float16; updated in place.
        grad: gradient of the attack loss w.r.t. ``x_adv``; same shape, dtype, device.
        x_clean: the clean images; same shape, dtype, device.
        step_size, epsilon, lower, upper: Python floats.

    Returns:
        ``x_adv`` (the same tensor object).
    """
    compute = opmath_dtype(x_adv.dtype)
    xa, g, xc = x_adv.to(compute), grad.to(compute), x_clean.to(compute)
    # 1. Ascent step: sign(0) = 0, sign(NaN) = NaN (torch.sign alone maps NaN to 0).
    y = xa + step_size * torch.where(torch.isnan(g), g, torch.sign(g))
    # 2. Projection on the L-inf ball around x_clean (torch.clamp with tensor bounds propagates NaN).
    y = torch.clamp(y, min=xc - epsilon, max=xc + epsilon)
    # 3. Projection on the box [lower, upper].
    y = torch.clamp(y, min=lower, max=upper)
    x_adv.copy_(y)
    return x_adv


def pgd_init_reference(
    x_clean: torch.Tensor,
    epsilon: float,
    lower: float = 0.0,
    upper: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform random start: ``clamp(x_clean + U(-eps, eps), lower, upper)`` (a new tensor).

    The noise is drawn in float32 on ``x_clean``'s device from ``generator`` (reproducible for a
    given generator state), added in float32, and rounded once to ``x_clean.dtype``.
    """
    compute = opmath_dtype(x_clean.dtype)
    noise = torch.rand(x_clean.shape, generator=generator, device=x_clean.device, dtype=compute)
    y = x_clean.to(compute) + (2.0 * noise - 1.0) * epsilon
    y = torch.clamp(
        torch.clamp(y, min=x_clean.to(compute) - epsilon, max=x_clean.to(compute) + epsilon),
        min=lower,
        max=upper,
    )
    return y.to(x_clean.dtype).contiguous(memory_format=_memory_format(x_clean))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
