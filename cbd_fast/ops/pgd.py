"""The fused PGD step and the PGD random start (CBD step 2's inner update).

``pgd_step`` replaces half a dozen elementwise kernels (sign, scale, add, two clamps against the
ball, two against the box) with one pass over memory. Backends (``cbd_fast.ops.backends``):

- ``cuda``:   ``torch.ops.cbd_fast.pgd_step_`` from the compiled extension (csrc/kernels/pgd.cu):
              16-byte vector loads, grid-stride; float32/bfloat16/float16.
- ``triton``: ``torch.ops.cbd_fast.pgd_step_triton`` (cbd_fast/kernels/triton/pgd.py), a
              ``torch.library.custom_op``; float32/bfloat16/float16.
- ``cpp``:    ``torch.ops.cbd_fast.pgd_step_`` on CPU (csrc/kernels/pgd_cpu.h): one vectorised pass,
              parallel over chunks; also float64.
- ``torch``:  ``cbd_fast.ops.reference.pgd_step_reference``, the executable specification.

Automatic choice (``_ORDER``): CUDA tensors try cuda, triton, torch; CPU tensors cpp, torch. float64
tensors go to cpp (CPU) or torch (CUDA). With ``backend=None`` a backend whose kernel fails to
compile or launch is recorded, warned about once and skipped (``cbd_fast.ops.backends.
run_with_fallback``); such failures happen before the kernel runs, so ``x_adv`` is untouched when
the next backend takes over. Every backend is bit-for-bit equal to the reference (values; the sign
of a zero result and NaN payloads are not specified), except the Triton interpreter on CPU, whose
float32 -> bfloat16/float16 casts may truncate (one ulp).

Both native ops have fake (meta) implementations registered here, so ``torch.compile`` traces them
and ``torch.library.opcheck`` can test them.
"""

from __future__ import annotations

import math

import torch

from cbd_fast.ops import _ext
from cbd_fast.ops.backends import run_with_fallback
from cbd_fast.ops.dispatch import (
    check_backend_dtype,
    check_float_tensor,
    check_real,
    op_backend_candidates,
    register_fake_once,
)
from cbd_fast.ops.reference import pgd_init_reference, pgd_step_reference

__all__ = ["pgd_step", "pgd_init", "check_pgd_step_args"]

# ---- torch.library registrations ------------------------------------------------------------------


@torch.library.custom_op("cbd_fast::pgd_step_triton", mutates_args=("x_adv",))
def _pgd_step_triton_op(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_clean: torch.Tensor,
    step_size: float,
    epsilon: float,
    lower: float,
    upper: float,
) -> None:
    from cbd_fast.kernels.triton.pgd import pgd_step_triton  # imports triton on first use only

    pgd_step_triton(x_adv, grad, x_clean, step_size, epsilon, lower, upper)


@_pgd_step_triton_op.register_fake
def _pgd_step_triton_fake(x_adv, grad, x_clean, step_size, epsilon, lower, upper) -> None:
    return None


def _pgd_step_native_fake(x_adv, grad, x_clean, step_size, epsilon, lower, upper) -> None:
    return None


_native_fake_registered = False


def _native_op() -> torch._ops.OpOverloadPacket:
    """``torch.ops.cbd_fast.pgd_step_`` with its fake implementation registered (once)."""
    global _native_fake_registered
    if _ext.load() is None:  # select_backend has already refused; this is a second line
        raise RuntimeError(f"pgd_step: the compiled extension is not loaded: {_ext.load_error()}")
    if not _native_fake_registered:
        register_fake_once("cbd_fast::pgd_step_", _pgd_step_native_fake)
        _native_fake_registered = True
    return torch.ops.cbd_fast.pgd_step_


# ---- validation -------------------------------------------------------------------------------------


def _check_scalar(name: str, value: object) -> float:
    value = check_real(name, value, kinds=" (int or float)")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def _check_box(lower: object, upper: object) -> tuple[float, float]:
    lo, hi = _check_scalar("lower", lower), _check_scalar("upper", upper)
    if lo > hi:
        raise ValueError(f"lower must be <= upper; got lower={lo}, upper={hi}")
    return lo, hi


def _is_dense(t: torch.Tensor) -> bool:
    """True when the elements fill exactly ``numel`` consecutive slots (any dim order: contiguous,
    channels_last, other permutations), i.e. the storage can be walked as one flat array."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(sa == sb for sz, sa, sb in zip(a.shape, a.stride(), b.stride()) if sz > 1)


def _partially_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when b's memory overlaps a's without being exactly a's (dense, same layout)."""
    if torch.compiler.is_compiling():  # traced tensors have no addresses; eager calls check
        return False
    try:
        pa, pb = a.data_ptr(), b.data_ptr()
    except RuntimeError:  # fake/meta tensors under tracing have no memory
        return False
    if pa == pb or pa == 0 or pb == 0:
        return False
    na, nb = a.numel() * a.element_size(), b.numel() * b.element_size()
    return pa < pb + nb and pb < pa + na


def check_pgd_step_args(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_clean: torch.Tensor,
    step_size: float,
    epsilon: float,
    lower: float = 0.0,
    upper: float = 1.0,
) -> tuple[float, float, float, float]:
    """Validate ``pgd_step``'s arguments (see there); return the four scalars as Python floats.

    Raises:
        TypeError: a tensor argument is not a tensor or not of a float dtype, dtypes differ, or a
            scalar is not a real number.
        ValueError: shapes or devices differ, a layout is not dense or differs between the tensors,
            x_adv partially overlaps grad or x_clean, a scalar is not finite, step_size or epsilon
            is negative, or lower > upper.
    """
    check_float_tensor("x_adv", x_adv)
    check_float_tensor("grad", grad)
    check_float_tensor("x_clean", x_clean)
    for name, t in (("grad", grad), ("x_clean", x_clean)):
        if t.dtype != x_adv.dtype:
            raise TypeError(f"{name} must have x_adv's dtype {x_adv.dtype}; got {t.dtype}")
        if t.shape != x_adv.shape:
            raise ValueError(f"{name} must have x_adv's shape {tuple(x_adv.shape)}; got {tuple(t.shape)}")
        if t.device != x_adv.device:
            raise ValueError(f"{name} must be on x_adv's device {x_adv.device}; got {t.device}")
    if not _is_dense(x_adv):
        raise ValueError(
            "x_adv must be dense and non-overlapping (contiguous or channels_last); got shape "
            f"{tuple(x_adv.shape)} with strides {x_adv.stride()}"
        )
    for name, t in (("grad", grad), ("x_clean", x_clean)):
        if not _same_layout(t, x_adv):
            raise ValueError(
                f"{name} must have x_adv's memory layout (strides {x_adv.stride()}); got strides "
                f"{t.stride()}: make both contiguous or both channels_last"
            )
        if _partially_overlaps(x_adv, t):
            raise ValueError(f"x_adv partially overlaps {name} in memory; pass separate tensors")
    step = _check_scalar("step_size", step_size)
    eps = _check_scalar("epsilon", epsilon)
    if step < 0:
        raise ValueError(f"step_size must be >= 0; got {step}")
    if eps < 0:
        raise ValueError(f"epsilon must be >= 0; got {eps}")
    lo, hi = _check_box(lower, upper)
    return step, eps, lo, hi


# ---- public API -------------------------------------------------------------------------------------


#: Automatic order of backends per device type (float64 aside: cpp, torch on CPU; torch on CUDA).
_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


def _resolve_backend(x: torch.Tensor, backend: str | None) -> str:
    return _candidates(x, backend)[0][0]


def _candidates(x: torch.Tensor, backend: str | None) -> tuple[list[str], bool]:
    """``(names, named)``: the backends to try in order, and whether the caller named the backend."""
    text = _backend_for(x.device, x.dtype, backend)
    return text.removeprefix("=").split(","), text.startswith("=")


@torch.compiler.assume_constant_result  # torch.compile: resolved once at trace time, not traced
def _backend_for(dev: torch.device, dtype: torch.dtype, backend: str | None) -> str:
    """The backends to try, comma-joined and ``=``-prefixed when named (a constant when traced)."""
    names, named = op_backend_candidates("pgd_step", dev, dtype, backend, _ORDER["cuda"], _ORDER["cpu"])
    if any(n in ("cpp", "cuda") for n in names):
        _native_op()  # registers the fake impl here: this function runs eagerly even under tracing
    check_backend_dtype("pgd_step", names[0], "x_adv", dtype)
    return ("=" if named else "") + ",".join(names)


def _step_on(name: str, x_adv, grad, x_clean, step: float, eps: float, lo: float, hi: float) -> None:
    """One fused step in place on backend ``name``."""
    check_backend_dtype("pgd_step", name, "x_adv", x_adv.dtype)
    if name in ("cpp", "cuda"):
        torch.ops.cbd_fast.pgd_step_(x_adv, grad, x_clean, step, eps, lo, hi)
    elif name == "triton":
        _pgd_step_triton_op(x_adv, grad, x_clean, step, eps, lo, hi)
    else:
        pgd_step_reference(x_adv, grad, x_clean, step, eps, lo, hi)


def pgd_step(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_clean: torch.Tensor,
    step_size: float,
    epsilon: float,
    *,
    lower: float = 0.0,
    upper: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """One signed-gradient ascent step projected on the L-inf ball and the box, in place, fused.

    ``x_adv <- clamp(clamp(x_adv + step_size * sign(grad), x_clean - epsilon, x_clean + epsilon),
    lower, upper)``, evaluated in float32 (float64 for float64 tensors) and rounded once to the
    tensor dtype (round to nearest even): bit-for-bit ``cbd_fast.ops.reference.pgd_step_reference``.
    sign(0) = 0, so a zero gradient leaves the element where it is (then projected). A NaN in
    ``grad``, ``x_adv`` or ``x_clean`` gives NaN at that element, for the caller's non-finite guard
    to report. The bounds hold as evaluated in the compute dtype; after rounding to bfloat16/float16
    ``|x_adv - x_clean|`` may exceed ``epsilon`` by up to half an ulp of that dtype.

    Works as an optimizer-style update: it runs without autograd recording, also on a leaf that
    requires grad.

    Args:
        x_adv: adversarial images, any shape, float32/bfloat16/float16 (float64: cpp and torch
            backends), dense: contiguous or channels_last (any dense layout). Updated in place.
        grad: the attack loss's gradient w.r.t. ``x_adv``; same shape, dtype, device and strides.
            Only its sign is used.
        x_clean: the clean images (ball centres); same shape, dtype, device and strides.
        step_size: the ascent step alpha >= 0 (e.g. 2/255), finite.
        epsilon: the L-inf radius >= 0 (e.g. 8/255), finite.
        lower: the box's lower bound (finite, <= upper); 0.0 for images in [0, 1].
        upper: the box's upper bound (finite).
        backend: "cuda", "triton", "cpp", "torch" or None (automatic; ``CBD_FAST_BACKEND``
            overrides; a backend that fails to compile or launch is skipped with a warning). A
            named backend that cannot serve these tensors raises RuntimeError, and its compile or
            launch errors are raised too.

    Returns:
        ``x_adv`` itself, updated.

    Raises:
        TypeError / ValueError: bad arguments, with the offending value (see ``check_pgd_step_args``).
        RuntimeError: the backend asked for cannot serve the tensors.

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> x_adv = x.clone()
        >>> g = torch.randn_like(x)
        >>> _ = pgd_step(x_adv, g, x, 2 / 255, 8 / 255)
        >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-7)
        True
    """
    step, eps, lo, hi = check_pgd_step_args(x_adv, grad, x_clean, step_size, epsilon, lower, upper)
    names, named = _candidates(x_adv, backend)
    if x_adv.numel() == 0:
        return x_adv
    with torch.no_grad():
        if torch.compiler.is_compiling():  # the backend is fixed at trace time; no try/except traced
            _step_on(names[0], x_adv, grad, x_clean, step, eps, lo, hi)
        else:
            run_with_fallback(
                "pgd_step",
                x_adv.device,
                x_adv.dtype,
                names,
                lambda name: _step_on(name, x_adv, grad, x_clean, step, eps, lo, hi),
                named=named,
            )
    return x_adv


def pgd_init(
    x_clean: torch.Tensor,
    epsilon: float,
    *,
    lower: float = 0.0,
    upper: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A uniform random start inside the L-inf ball around ``x_clean`` and inside the box.

    ``clamp(clamp(x_clean + U(-epsilon, epsilon), x_clean - epsilon, x_clean + epsilon), lower,
    upper)``: the noise is drawn in float32 (float64 for float64) in the logical element order,
    so one generator state gives the same values whatever the memory format, then rounded once to
    ``x_clean.dtype``. The result is a new tensor with ``x_clean``'s memory format (channels_last
    stays channels_last), never requiring grad.

    Args:
        x_clean: clean images, any shape, float32/bfloat16/float16/float64.
        epsilon: the L-inf radius >= 0, finite.
        lower, upper: the box (finite, lower <= upper).
        generator: a ``torch.Generator`` on ``x_clean``'s device type for reproducible starts, or
            None for the global generator.

    Returns:
        A tensor like ``x_clean``.

    Example:
        >>> x = torch.rand(2, 3, 4, 4)
        >>> a = pgd_init(x, 8 / 255, generator=torch.Generator().manual_seed(0))
        >>> b = pgd_init(x, 8 / 255, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(a, b)
        True
    """
    check_float_tensor("x_clean", x_clean)
    eps = _check_scalar("epsilon", epsilon)
    if eps < 0:
        raise ValueError(f"epsilon must be >= 0; got {eps}")
    lo, hi = _check_box(lower, upper)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        if generator.device.type != x_clean.device.type:
            raise ValueError(
                f"generator must be on x_clean's device type {x_clean.device.type!r}; got {generator.device}"
            )
    with torch.no_grad():
        return pgd_init_reference(x_clean.detach(), eps, lo, hi, generator)
