"""Pure-PyTorch reference of every op: the executable specification and the last fallback.

Every other backend (cpp, triton, cuda) is tested against these functions. They are written
for clarity, not speed: ``nt_xent_reference`` materialises the full 2N x 2N score matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "nt_xent_reference",
    "nt_xent_fwd_reference",
    "nt_xent_bwd_reference",
    "pgd_step_reference",
    "pgd_init_reference",
    "opmath_dtype",
    "NORM_EPS",
]

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


def _row_chunk(two_n: int) -> int:
    """Rows per chunk of the contract references: about 2^26 scores (256 MiB of float32) at a time."""
    return max(1, min(two_n, (1 << 26) // max(two_n, 1)))


def nt_xent_fwd_reference(
    za: torch.Tensor, zb: torch.Tensor, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward's contract (``nt_xent_fwd`` ops) in PyTorch, chunked over rows.

    Args:
        za, zb: [N, D] L2-normalised views (any float dtype; computed in float32, float64 for
            float64).
        inv_temp: 1 / temperature.

    Returns:
        ``(loss, lse)``: the 0-dim mean over the 2N rows of ``lse_i - s_{i,p(i)}`` and ``lse`` [2N],
        ``lse_i = logsumexp_{j != i} s_ij``, ``s_ij = inv_temp * <u_i, u_j>``, ``u = [za; zb]``;
        both float32 (float64 for float64 inputs). The 2N x 2N matrix is built a row chunk at a time.
    """
    compute = opmath_dtype(za.dtype)
    u = torch.cat([za, zb], dim=0).to(compute)
    two_n, n = u.shape[0], za.shape[0]
    lse = torch.empty(two_n, dtype=compute, device=u.device)
    term = torch.empty(two_n, dtype=compute, device=u.device)
    step = _row_chunk(two_n)
    for r0 in range(0, two_n, step):
        r1 = min(r0 + step, two_n)
        rows = torch.arange(r0, r1, device=u.device)
        local = rows - r0
        s = (u[r0:r1] @ u.T) * inv_temp
        pos = s[local, (rows + n) % two_n]  # the partner p(i) = i +- N
        s[local, rows] = float("-inf")  # j != i
        lse[r0:r1] = torch.logsumexp(s, dim=1)
        term[r0:r1] = lse[r0:r1] - pos
    loss = (term.sum(dtype=torch.float64) / two_n).to(compute)
    return loss, lse


def nt_xent_bwd_reference(
    grad: torch.Tensor,
    za: torch.Tensor,
    zb: torch.Tensor,
    lse: torch.Tensor,
    inv_temp: float,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused backward's contract (``nt_xent_bwd`` ops) in PyTorch, chunked over rows.

    ``dL/du_k = grad * inv_temp / (2N) * (sum_{j != k} W_kj u_j - 2 u_{p(k)})`` with
    ``W_kj = exp(s_kj - lse_k) + exp(s_kj - lse_j)`` (s is symmetric).

    Args:
        grad: one-element tensor, the loss's incoming gradient.
        za, zb: [N, D] the forward's inputs. lse: [2N] the forward's output. inv_temp: 1 / tau.
        need_a, need_b: which sides to compute.

    Returns:
        ``(grad_za, grad_zb)``, each [N, D] in za's dtype, or an empty tensor for a side not needed.
    """
    compute = opmath_dtype(za.dtype)
    n = za.shape[0]
    ga = torch.empty_like(za) if need_a else za.new_empty((0,))
    gb = torch.empty_like(zb) if need_b else zb.new_empty((0,))
    if not (need_a or need_b):
        return ga, gb
    u = torch.cat([za, zb], dim=0).to(compute)
    lse = lse.to(device=u.device, dtype=compute)
    two_n = u.shape[0]
    coef = grad.reshape(()).to(device=u.device, dtype=compute) * (inv_temp / two_n)
    row_start, row_end = (0 if need_a else n), (two_n if need_b else n)
    step = _row_chunk(two_n)
    for r0 in range(row_start, row_end, step):
        r1 = min(r0 + step, row_end)
        rows = torch.arange(r0, r1, device=u.device)
        local = rows - r0
        s = (u[r0:r1] @ u.T) * inv_temp
        w = torch.exp(s - lse[r0:r1, None]) + torch.exp(s - lse[None, :])
        w[local, rows] = 0.0  # j != k
        out = coef * (w @ u - 2.0 * u[(rows + n) % two_n])
        if r0 < n:  # rows of za
            ga[r0 : min(r1, n)] = out[: min(r1, n) - r0].to(za.dtype)
        if r1 > n:  # rows of zb
            lo = max(r0, n)
            gb[lo - n : r1 - n] = out[lo - r0 :].to(zb.dtype)
    return ga, gb


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
