"""Per-sample randomness: one counter-based RNG keyed by (seed, epoch, stream, sample index).

Every random number of the loop (PGD random starts, augmentation offsets) comes from
:func:`per_sample_uniform`, so a sample gets the same numbers whatever batch, rank or position it
lands in: a run on 1 process, on N ranks, or resumed from a checkpoint draws the same noise.
Python's ``random`` and NumPy are never used.
"""

from __future__ import annotations

import math

import torch

__all__ = ["per_sample_uniform", "random_start"]


def random_start(x: torch.Tensor, u: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``clamp(clamp(x + (2u - 1) * eps, x - eps, x + eps), 0, 1)`` computed in float32, in x's dtype.

    Args:
        x: [B, ...] float clean images in [0, 1].
        u: uniform [0, 1) noise of x's shape (float32, same device), e.g. from :func:`per_sample_uniform`.
        epsilon: L-inf radius (>= 0).

    Returns:
        a new tensor like ``x`` (same dtype and memory format).
    """
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon}")
    if u.shape != x.shape:
        raise ValueError(f"u must have x's shape {tuple(x.shape)}; got {tuple(u.shape)}")
    xf = x.float()
    y = xf + (2.0 * u - 1.0) * epsilon
    y = torch.clamp(torch.minimum(torch.maximum(y, xf - epsilon), xf + epsilon), 0.0, 1.0)
    fmt = (
        torch.channels_last
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    return y.to(x.dtype).contiguous(memory_format=fmt)


_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2^32 for int64 ``a`` in [0, 2^32) and a constant ``b`` < 2^32, without int64 overflow."""
    lo, hi = b & 0xFFFF, b >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def per_sample_uniform(
    indices: torch.Tensor,
    sample_shape: torch.Size | tuple[int, ...],
    *,
    seed: int,
    epoch: int,
    stream: int = 0,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Uniform [0, 1) float32 noise per sample, a pure function of (seed, epoch, stream, index, element).

    Args:
        indices: [B] integer tensor of sample indices (>= 0) on the target device.
        sample_shape: the shape of one sample's noise, e.g. (C, H, W).
        seed: run seed (>= 0).
        epoch: 0-based epoch (>= 0).
        stream: an extra key to draw independent noises for the same sample (>= 0).
        chunk_elements: bound on the elements hashed at once (memory: ~5 int64 temporaries each).

    Returns:
        [B, *sample_shape] float32 tensor on ``indices.device``. On CPU each sample's row comes from a
        torch.Generator seeded with the sample's 32-bit key; on other devices from a counter-based hash
        evaluated there (24 random bits per value). Either way a sample's noise depends only on
        (seed, epoch, stream, index), not on the batch or rank it lands in; CPU and CUDA values differ.
    """
    if (
        not isinstance(indices, torch.Tensor)
        or indices.dim() != 1
        or indices.dtype.is_floating_point
        or indices.dtype.is_complex
        or indices.dtype == torch.bool
    ):
        raise TypeError(
            f"indices must be a 1-D integer tensor; got {type(indices).__name__} "
            f"{getattr(indices, 'dtype', '')} {tuple(getattr(indices, 'shape', ()))}"
        )
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(f"indices must be >= 0; got min {int(indices.min())}")
    dev = indices.device
    m = 1
    for s in sample_shape:
        m *= int(s)
    # 1. key_i = H(H(H(H(seed) ^ epoch) ^ stream) ^ index_lo ^ H(index_hi)): one 32-bit key per sample.
    k = _hash32(torch.full((1,), int(seed) & _MASK32, dtype=torch.int64, device=dev) ^ 0x5BD1E995)
    k = _hash32(k ^ (int(epoch) & _MASK32))
    k = _hash32(k ^ (int(stream) & _MASK32))
    idx = indices.to(torch.int64)
    key = _hash32(k ^ (idx & _MASK32) ^ _hash32((idx >> 32) & _MASK32))  # [B]
    shape = (indices.shape[0], *[int(s) for s in sample_shape])
    if dev.type == "cpu":
        return _generator_uniform(key, m).view(shape)
    return _hashed_uniform(key, m, chunk_elements).view(shape)


def _generator_uniform(key: torch.Tensor, m: int) -> torch.Tensor:
    """CPU: row i = torch.rand(m) from a generator seeded with key_i (seeding costs ~microseconds,
    much less than hashing every element with unfused int64 ops)."""
    out = torch.empty((key.shape[0], m), dtype=torch.float32)
    gen = torch.Generator()
    for r, ki in enumerate(key.tolist()):
        gen.manual_seed(int(ki) | (1 << 32))
        torch.rand((m,), generator=gen, out=out[r])
    return out


def _hashed_uniform(key: torch.Tensor, m: int, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Accelerators: a counter-based hash of (key_i, element j), evaluated on key's device in chunks."""
    dev = key.device
    out = torch.empty((key.shape[0], m), dtype=torch.float32, device=dev)
    rows = max(1, chunk_elements // max(m, 1))
    j = torch.arange(m, dtype=torch.int64, device=dev)
    jh = _hash32(_mul32(j, 0x9E3779B1) ^ 0x68E31DA4)  # 2. a per-element counter hash [M]
    for r0 in range(0, key.shape[0], rows):
        # 3. value_ij = H(H(key_i ^ jh_j) + key_i): two rounds over the pair.
        kk = key[r0 : r0 + rows, None]
        v = _hash32((_hash32(kk ^ jh[None, :]) + kk) & _MASK32)
        # 4. top 24 bits -> float32 in [0, 1) exactly representable.
        out[r0 : r0 + rows] = (v >> 8).to(torch.float32) * (1.0 / (1 << 24))
    return out
