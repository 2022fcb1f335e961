"""The fused NT-Xent loss (SimCLR's normalized temperature-scaled cross entropy), forward and backward.

CBD evaluates this loss K + 1 times per batch (every PGD step and the fine-tuning step). The naive
form builds the 2N x 2N score matrix; the fused kernels never do: the forward keeps only a running
log-sum-exp per row (flash-style) and saves ``lse`` [2N]; the backward recomputes score tiles.

Pipeline of ``nt_xent(a, b, temperature)``:

1. Rows are L2-normalised in float64 (float32 squares overflow past ~1e19), ``F.normalize(eps=1e-12)``:
   a zero row stays zero. Autograd differentiates this step (the normalisation Jacobian).
2. The kernels take the normalised views ``za, zb`` [N, D] and ``inv_temp = 1 / temperature``.
   cpp and torch receive them in float32 (float64); triton and cuda receive bfloat16/float16
   inputs' normalised rows rounded back to the input dtype (tensor-core dot products, float32
   accumulation).
3. One ``torch.autograd.Function`` sits above dispatch: it saves ``za, zb, lse`` only when a
   gradient is needed, and the backward computes only the rows of the side(s) that need one (the
   PGD phase, where the clean anchors ``b`` are constants, costs half a backward).

Backends (``cbd_fast.ops.backends``): ``cuda`` and ``cpp`` are ``torch.ops.cbd_fast.nt_xent_fwd/bwd``
from the compiled extension (csrc/kernels/nt_xent.cu, csrc/kernels/nt_xent_cpu.h); ``triton`` is
``torch.ops.cbd_fast.nt_xent_fwd_triton/bwd_triton`` (cbd_fast/kernels/triton/nt_xent.py, also on
CPU tensors under ``TRITON_INTERPRET=1``); ``torch`` is ``cbd_fast.ops.reference.nt_xent_reference``.
Automatic choice: CPU tensors try cpp, torch. CUDA tensors (``_cuda_order``, from fwd+bwd timings
on an H200): torch first for float32 up to 2N = 16384 and 16-bit up to 2N = 2048 (the fused
kernels lose to the 2N x 2N matmuls there), else triton, then torch while its matrix is
affordable, then cuda.
float64 runs on cpp or torch only. All four ops have fake (meta) implementations registered here,
so ``torch.compile(fullgraph=True)`` traces ``nt_xent`` and ``torch.library.opcheck`` passes.

Fallback (``cbd_fast.ops.backends.run_with_fallback``): with ``backend=None``, a backend whose
kernel fails to compile or launch (forward or backward) is recorded, warned about once, and the
call runs on the next backend of the order; a backward that fails falls back on the same saved
``za, zb, lse`` (every backend shares that contract; past the compiled backends,
``cbd_fast.ops.reference.nt_xent_bwd_reference``). Under ``torch.compile`` the backend is fixed
when tracing (backends that failed before are skipped) and errors propagate.

The loss is returned as float32 for float32/bfloat16/float16 inputs (float64 for float64 inputs).
A NaN or Inf anywhere in the inputs gives a NaN loss (and NaN gradients); nothing crashes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cbd_fast.ops import _ext
from cbd_fast.ops.backends import run_with_fallback
from cbd_fast.ops.dispatch import (
    check_backend_dtype,
    check_float_tensor,
    check_real,
    op_backend_candidates,
    register_fake_once,
)
from cbd_fast.ops.reference import NORM_EPS, nt_xent_bwd_reference, nt_xent_reference, opmath_dtype

__all__ = ["nt_xent", "nt_xent_value_and_grad", "check_nt_xent_args"]

# ---- torch.library registrations ------------------------------------------------------------------


def _fwd_fake(za: torch.Tensor, zb: torch.Tensor, inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    dt = opmath_dtype(za.dtype)
    return za.new_empty((), dtype=dt), za.new_empty((2 * za.shape[0],), dtype=dt)


def _bwd_fake(
    grad: torch.Tensor,
    za: torch.Tensor,
    zb: torch.Tensor,
    lse: torch.Tensor,
    inv_temp: float,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ga = torch.empty_like(za) if need_a else za.new_empty((0,))
    gb = torch.empty_like(zb) if need_b else zb.new_empty((0,))
    return ga, gb


@torch.library.custom_op("cbd_fast::nt_xent_fwd_triton", mutates_args=())
def _fwd_triton_op(za: torch.Tensor, zb: torch.Tensor, inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    from cbd_fast.kernels.triton.nt_xent import nt_xent_fwd_triton  # imports triton on first use only

    return nt_xent_fwd_triton(za, zb, inv_temp)


@torch.library.custom_op("cbd_fast::nt_xent_bwd_triton", mutates_args=())
def _bwd_triton_op(
    grad: torch.Tensor,
    za: torch.Tensor,
    zb: torch.Tensor,
    lse: torch.Tensor,
    inv_temp: float,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from cbd_fast.kernels.triton.nt_xent import nt_xent_bwd_triton

    return nt_xent_bwd_triton(grad, za, zb, lse, inv_temp, need_a, need_b)


_fwd_triton_op.register_fake(_fwd_fake)
_bwd_triton_op.register_fake(_bwd_fake)


def _register_native_fakes() -> None:
    """Fake impls of the compiled ops, when the extension loads (a missing one is not an error)."""
    if _ext.load() is None:
        return
    register_fake_once("cbd_fast::nt_xent_fwd", _fwd_fake)
    register_fake_once("cbd_fast::nt_xent_bwd", _bwd_fake)


_register_native_fakes()


def _fwd_op(backend: str):
    return torch.ops.cbd_fast.nt_xent_fwd_triton if backend == "triton" else torch.ops.cbd_fast.nt_xent_fwd


def _bwd_op(backend: str):
    return torch.ops.cbd_fast.nt_xent_bwd_triton if backend == "triton" else torch.ops.cbd_fast.nt_xent_bwd


# ---- autograd ----------------------------------------------------------------------------------------


def _bwd_call(
    name: str,
    grad: torch.Tensor,
    za: torch.Tensor,
    zb: torch.Tensor,
    lse: torch.Tensor,
    inv_temp: float,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused backward on backend ``name`` ("torch": the chunked PyTorch contract)."""
    if name == "torch":
        return nt_xent_bwd_reference(grad, za, zb, lse, inv_temp, need_a, need_b)
    return _bwd_op(name)(grad, za, zb, lse, inv_temp, need_a, need_b)


class _NTXentFunction(torch.autograd.Function):
    """loss = NT-Xent of the already-normalised views; d loss / d(za, zb) from the fused backward.

    ``chain`` is the comma-joined list of backends, starting with ``backend``, that the backward may
    fall back on (``named``: no fallback); ``dtype`` is the caller's input dtype (the failure key).
    """

    @staticmethod
    def forward(
        ctx,
        za: torch.Tensor,
        zb: torch.Tensor,
        inv_temp: float,
        backend: str,
        chain: str = "",
        named: bool = True,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        loss, lse = _fwd_op(backend)(za, zb, inv_temp)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(za, zb, lse)
        ctx.inv_temp = inv_temp
        ctx.chain = [n for n in chain.split(",") if n] or [backend]
        ctx.named = named
        ctx.dtype = dtype or za.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        za, zb, lse = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        args = (grad.float().contiguous(), za, zb, lse, ctx.inv_temp, need_a, need_b)
        if torch.compiler.is_compiling():
            ga, gb = _bwd_call(ctx.chain[0], *args)
        else:
            ga, gb = run_with_fallback(
                "nt_xent",
                za.device,
                ctx.dtype,
                ctx.chain,
                lambda name: _bwd_call(name, *args),
                named=ctx.named,
            )
        return (ga if need_a else None), (gb if need_b else None), None, None, None, None, None


# ---- validation and dispatch -------------------------------------------------------------------------


def check_nt_xent_args(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    """Validate ``nt_xent``'s arguments (see there); return ``temperature`` as a Python float.

    Raises:
        TypeError: ``a``/``b`` are not tensors or not of a float dtype, their dtypes differ, or
            ``temperature`` is not a real number.
        ValueError: not 2-D, shapes differ, N < 2 or D < 1, devices differ, or ``temperature`` is
            not finite and > 0.
    """
    for name, t in (("a", a), ("b", b)):
        check_float_tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, D]; got {t.dim()}-D shape {tuple(t.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}; got {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype {a.dtype}; got {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"a and b must be on the same device; got a on {a.device}, b on {b.device}")
    if a.shape[0] < 2:
        raise ValueError(f"a must have N >= 2 rows (each row needs a negative); got N={a.shape[0]}")
    if a.shape[1] < 1:
        raise ValueError(f"a must have D >= 1 features; got D={a.shape[1]}")
    tau = check_real("temperature", temperature)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature must be finite and > 0; got {temperature}")
    return tau


#: Automatic order of backends per device type (float64 aside: cpp, torch on CPU; torch on CUDA).
#: CUDA tensors: ``_cuda_order`` picks one of these by dtype and 2N.
_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "torch", "cuda"), "cpu": ("cpp", "torch")}

#: 2N up to which the torch backend (the 2N x 2N matrix) goes first on CUDA: float32 up to 16384
#: rows (1 GiB of float32 scores), 16-bit up to 2048. Measured fwd+bwd on an H200
#: (benchmarks/results/gpu_check_nvidia-h200_20261204): eager / triton / cuda ms at 2N=1024 D=128
#: bf16 1.73 / 2.20 / 1.49, 2N=4096 D=256 fp32 2.14 / 7.84 / 7.04, 2N=8192 D=512 bf16
#: 7.47 / 3.46 / 27.9, 2N=32768 D=128 bf16 51.4 / 6.28 / 57.7. The cuda kernel (float32 FMA
#: tiles, no tensor cores) goes after torch while the matrix is affordable.
_EAGER_FIRST_MAX_2N = {"float32": 16384, "bfloat16": 2048, "float16": 2048}
_EAGER_AFFORDABLE_2N = 16384


def _cuda_order(dtype: str, two_n: int) -> tuple[str, ...]:
    """The automatic backend order for CUDA tensors of ``dtype`` (name) with 2N rows."""
    if two_n <= _EAGER_FIRST_MAX_2N.get(dtype, 0):
        return ("torch", "triton", "cuda")
    return _ORDER["cuda"] if two_n <= _EAGER_AFFORDABLE_2N else ("triton", "cuda", "torch")


@torch.compiler.assume_constant_result
def _select(device: str, dtype: str, backend: str | None, gpu_order: str) -> str:
    """The backends to try for (device, dtype, request), comma-joined, ``=``-prefixed when named.

    A string so that it is a constant while torch.compile traces (resolved once, not traced).
    ``gpu_order``: ``_cuda_order``'s tuple, comma-joined.
    """
    order = tuple(gpu_order.split(","))
    names, named = op_backend_candidates(
        "nt_xent", torch.device(device), getattr(torch, dtype), backend, order, _ORDER["cpu"]
    )
    return ("=" if named else "") + ",".join(names)


def _candidates(a: torch.Tensor, backend: str | None) -> tuple[list[str], bool]:
    """``(names, named)``: the backends to try in order, and whether the caller named the backend."""
    dtype = str(a.dtype).removeprefix("torch.")
    gpu_order = ",".join(_cuda_order(dtype, 2 * a.shape[0])) if a.device.type == "cuda" else ""
    text = _select(str(a.device), dtype, backend, gpu_order or ",".join(_ORDER["cuda"]))
    named = text.startswith("=")
    names = text.removeprefix("=").split(",")
    check_backend_dtype("nt_xent", names[0], "a", a.dtype)
    return names, named


def _resolve_backend(a: torch.Tensor, backend: str | None) -> str:
    """The backend a call starts with (see ``_candidates``)."""
    return _candidates(a, backend)[0][0]


def _normalized(x: torch.Tensor, backend: str) -> torch.Tensor:
    """Step 1-2: float32/float64 L2 normalisation; 16-bit rows go back to 16 bits for triton/cuda."""
    # float64 norms: the squares of float32/bfloat16 features beyond ~1e19 would overflow float32
    z = F.normalize(x.to(torch.float64), dim=1, eps=NORM_EPS).to(opmath_dtype(x.dtype))
    if backend in ("triton", "cuda") and x.dtype in (torch.bfloat16, torch.float16):
        z = z.to(x.dtype)
    return z.contiguous()


def nt_xent(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two views, fused: no 2N x 2N matrix is ever stored.

    ``(1/2N) * sum_i [ logsumexp_{j != i} s_ij - s_{i,p(i)} ]`` with ``s_ij = <u_i, u_j> / tau``,
    ``u = [normalize(a); normalize(b)]`` (2N rows) and ``p(i)`` the partner of row ``i`` in the
    other view; equal to ``cbd_fast.ops.reference.nt_xent_reference`` up to rounding.

    Differentiable with respect to ``a`` and ``b``; when only one of them requires grad (CBD's PGD
    phase: the clean anchors are constants) the backward spends no work on the other.

    Args:
        a: [N, D] features of view one, N >= 2, D >= 1; float32, bfloat16, float16 or float64
            (float64: cpp and torch backends). Any strides.
        b: [N, D] features of view two, same shape, dtype and device; row ``i`` of ``b`` is the
            positive of row ``i`` of ``a``.
        temperature: tau, finite and > 0 (0.5 is SimCLR's and CBD's default).
        backend: "cuda", "triton", "cpp", "torch" or None (automatic; ``CBD_FAST_BACKEND``
            overrides; a backend that fails to compile or launch is skipped with a
            ``BackendFallbackWarning``, once). A named backend that cannot serve these tensors
            raises RuntimeError, and its compile or launch errors are raised too.

    Returns:
        0-dim tensor, float32 (float64 for float64 inputs), on ``a``'s device. NaN when any input
        element is NaN or Inf.

    Raises:
        TypeError / ValueError: bad arguments, naming the argument and its value.
        RuntimeError: the backend asked for cannot serve the tensors.

    Example:
        >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = nt_xent(a, b, temperature=0.5)
        >>> bool(torch.isclose(loss, cbd_fast.ops.reference.nt_xent_reference(a, b, 0.5)))  # doctest: +SKIP
        True
    """
    tau = check_nt_xent_args(a, b, temperature)
    names, named = _candidates(a, backend)
    if torch.compiler.is_compiling():  # the backend is fixed at trace time; no try/except traced
        return _nt_xent_on(names[0], names, True, a, b, tau)
    return run_with_fallback(
        "nt_xent",
        a.device,
        a.dtype,
        names,
        lambda name: _nt_xent_on(name, names, named, a, b, tau),
        named=named,
    )


def _nt_xent_on(
    name: str, names: list[str], named: bool, a: torch.Tensor, b: torch.Tensor, tau: float
) -> torch.Tensor:
    """``nt_xent`` on backend ``name``; its backward may fall back on the backends after it."""
    check_backend_dtype("nt_xent", name, "a", a.dtype)
    if name == "torch":
        return nt_xent_reference(a, b, tau)
    za, zb = _normalized(a, name), _normalized(b, name)
    chain = ",".join(names[names.index(name) :]) if name in names else name
    return _NTXentFunction.apply(za, zb, 1.0 / tau, name, chain, named, a.dtype)


def nt_xent_value_and_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and its gradient with respect to ``a`` only, in one call, without autograd.

    What CBD's PGD phase needs (``b`` holds constant clean anchors): the forward, then the backward
    for the N rows of ``a`` only, then the normalisation Jacobian
    ``dL/da_i = (g_i - z_i <z_i, g_i>) / ||a_i||`` (``g_i / eps`` for rows with ``||a_i|| <= eps``,
    as ``F.normalize`` differentiates). Nothing is recorded on the autograd tape.

    Args:
        a: [N, D] features that the gradient is taken with respect to (see ``nt_xent``).
        b: [N, D] the other view (treated as a constant).
        temperature: tau, finite and > 0.
        backend: as for ``nt_xent``.

    Returns:
        ``(loss, grad_a)``: the 0-dim loss (float32, float64 for float64 inputs) and ``grad_a``
        [N, D] in ``a``'s dtype, equal to ``torch.autograd.grad(nt_xent(a, b, tau), a)``.

    Example:
        >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss, grad_a = nt_xent_value_and_grad(a, b)
        >>> grad_a.shape
        torch.Size([8, 16])
    """
    tau = check_nt_xent_args(a, b, temperature)
    names, named = _candidates(a, backend)
    if torch.compiler.is_compiling():
        return _value_and_grad_on(names[0], a, b, tau)
    return run_with_fallback(
        "nt_xent", a.device, a.dtype, names, lambda name: _value_and_grad_on(name, a, b, tau), named=named
    )


def _value_and_grad_on(
    name: str, a: torch.Tensor, b: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nt_xent_value_and_grad`` on backend ``name``."""
    check_backend_dtype("nt_xent", name, "a", a.dtype)
    with torch.no_grad():
        if name == "torch":
            with torch.enable_grad():
                a_ = a.detach().requires_grad_(True)
                loss = nt_xent_reference(a_, b.detach(), tau)
                (grad_a,) = torch.autograd.grad(loss, a_)
            return loss.detach(), grad_a
        compute = torch.float64  # as _normalized: float32 squares of features beyond ~1e19 overflow
        x = a.to(compute)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        za, zb = _normalized(a, name), _normalized(b, name)
        inv_temp = 1.0 / tau
        loss, lse = _fwd_op(name)(za, zb, inv_temp)
        one = torch.ones((), dtype=torch.float32, device=a.device)
        g_z, _ = _bwd_op(name)(one, za, zb, lse, inv_temp, True, False)
        # normalisation Jacobian of z = x / max(||x||, eps), applied to g = dL/dz
        g = g_z.to(compute)
        z = x / norm.clamp_min(NORM_EPS)
        radial = (z * g).sum(dim=1, keepdim=True)
        grad_a = torch.where(norm > NORM_EPS, (g - z * radial) / norm.clamp_min(NORM_EPS), g / NORM_EPS)
        return loss, grad_a.to(a.dtype)
