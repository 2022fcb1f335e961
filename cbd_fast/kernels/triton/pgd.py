"""Triton kernel of the fused PGD step (the ``triton`` backend of ``cbd_fast.ops.pgd_step``).

One pass over dense storage: three loads and one store per element, float32 opmath, one
round-to-nearest-even to the storage dtype on GPU. Importing this module imports Triton; on CPU
set ``TRITON_INTERPRET=1`` before importing it (the interpreter truncates float32 -> bfloat16 /
float16 casts instead of rounding them, so there the 16-bit results may be one ulp off the
reference; float32 is exact everywhere).

``hopper_compile_specs()`` lists every ``@triton.jit`` kernel here with concrete signatures so that
``scripts/check_triton_hopper.py`` can compile them for sm_90 without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cbd_fast.kernels.triton._utils import TL_DTYPE, device_guard, dtype_name, pointer_type

__all__ = ["pgd_step_triton", "hopper_compile_specs", "BLOCK"]

#: Elements per program: 4096 elements = 16 KiB of float32 per tensor per program.
BLOCK = 4096
_NUM_WARPS = 8


@triton.jit
def _pgd_step_kernel(
    x_adv_ptr,
    grad_ptr,
    x_clean_ptr,
    n,
    step,
    eps,
    lower,
    upper,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(x_adv_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    c = tl.load(x_clean_ptr + offs, mask=mask).to(tl.float32)
    # 1. d = step * sign(g): +step, -step, 0 for +-0, NaN for NaN (g != g only for NaN).
    d = tl.where(g > 0, step, tl.where(g < 0, -step, tl.where(g != g, g, 0.0)))
    # 2. Ascent step (a NaN in a or g gives NaN).
    y = a + d
    # 3. Projection on the ball [c - eps, c + eps]; NaN in either operand propagates (NaN c -> NaN).
    y = tl.maximum(y, c - eps, propagate_nan=tl.PropagateNan.ALL)
    y = tl.minimum(y, c + eps, propagate_nan=tl.PropagateNan.ALL)
    # 4. Projection on the box [lower, upper].
    y = tl.maximum(y, lower, propagate_nan=tl.PropagateNan.ALL)
    y = tl.minimum(y, upper, propagate_nan=tl.PropagateNan.ALL)
    # 5. One rounding (to nearest even on GPU) to the storage dtype.
    tl.store(x_adv_ptr + offs, y.to(x_adv_ptr.dtype.element_ty), mask=mask)


def pgd_step_triton(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_clean: torch.Tensor,
    step_size: float,
    epsilon: float,
    lower: float,
    upper: float,
) -> None:
    """Launch the fused step in place on ``x_adv`` (no checks: ``cbd_fast.ops.pgd_step`` validates).

    Args:
        x_adv: dense (contiguous or channels_last) float32/bfloat16/float16 tensor, updated in place.
        grad: same shape, dtype, device and strides as ``x_adv``; the attack loss's input gradient.
        x_clean: same shape, dtype, device and strides; the clean images (ball centres).
        step_size, epsilon, lower, upper: Python floats (passed to the kernel as float32).

    Launched under ``torch.cuda.device(x_adv.device)`` and on that device's current stream.
    """
    n = x_adv.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK),)
    with device_guard(x_adv):  # Triton launches on the current device: make it x_adv's
        _pgd_step_kernel[grid](
            x_adv,
            grad,
            x_clean,
            n,
            float(step_size),
            float(epsilon),
            float(lower),
            float(upper),
            BLOCK=BLOCK,
            num_warps=_NUM_WARPS,
        )


def hopper_compile_specs() -> list[dict]:
    """Every kernel of this module with concrete signatures, for an ahead-of-time sm_90 compile.

    Returns:
        A list of ``{"name", "fn", "signature", "constexprs"}`` dicts, one per storage dtype
        (float32, bfloat16, float16), for ``triton.compiler.ASTSource(fn, signature, constexprs)``.
    """
    specs = []
    for dtype in TL_DTYPE:
        ptr = pointer_type(dtype)
        signature = {
            "x_adv_ptr": ptr,
            "grad_ptr": ptr,
            "x_clean_ptr": ptr,
            "n": "i64",
            "step": "fp32",
            "eps": "fp32",
            "lower": "fp32",
            "upper": "fp32",
            "BLOCK": "constexpr",
        }
        specs.append(
            {
                "name": f"pgd_step_{dtype_name(dtype)}",
                "fn": _pgd_step_kernel,
                "signature": signature,
                "constexprs": {"BLOCK": BLOCK},
            }
        )
    return specs
