"""Triton kernels of the fused NT-Xent loss (the ``triton`` backend of ``cbd_fast.ops.nt_xent``).

The same algorithm as the C++ and CUDA cores (csrc/kernels/nt_xent_cpu.h): the inputs are the
L2-normalised views ``za, zb`` [N, D] (contiguous); row ``i`` of ``u = [za; zb]`` is read from
``za`` or ``zb`` by a pointer select, never concatenated. The forward keeps a running
log-sum-exp per row (flash-style) and writes ``lse`` [2N]; the backward recomputes score tiles
and writes only the rows of the side(s) asked for. Dot products run on tensor cores for
bfloat16/float16 (float32 accumulation) and in full float32 (``input_precision="ieee"``) for
float32 inputs.

Importing this module imports Triton. On CPU tensors set ``TRITON_INTERPRET=1`` before importing
it; the interpreter's bfloat16 ``tl.dot`` is wrong, so there tiles are upcast to float32 first.

``hopper_compile_specs()`` lists every ``@triton.jit`` kernel here with concrete signatures so
that ``scripts/check_triton_hopper.py`` can compile them for sm_90 without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cbd_fast.kernels.triton._utils import TL_DTYPE, dtype_name, interpreting, pointer_type

__all__ = ["nt_xent_fwd_triton", "nt_xent_bwd_triton", "hopper_compile_specs", "block_sizes"]


@triton.jit
def _row_ptrs(za_ptr, zb_ptr, rows, N, D):
    """Base pointers of rows of u = [za; zb] (rows < N in za, the others in zb)."""
    r = rows.to(tl.int64)
    return tl.where(r < N, za_ptr + r * D, zb_ptr + (r - N) * D)


@triton.jit
def _score_tile(
    za_ptr, zb_ptr, rows, cols, N, D, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """(1) s_ij = inv_temp * <u_i, u_j> for a [BLOCK_M, BLOCK_N] tile, float32 accumulation."""
    row_base = _row_ptrs(za_ptr, zb_ptr, rows, N, D)
    col_base = _row_ptrs(za_ptr, zb_ptr, cols, N, D)
    row_ok = rows < 2 * N
    col_ok = cols < 2 * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(row_base[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(col_base[:, None] + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.jit
def _nt_xent_fwd_kernel(
    za_ptr, zb_ptr, lse_ptr, term_ptr, N, D, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_M rows of u: lse_i and term_i = lse_i - s_{i,p(i)}."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < 2 * N
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(0, 2 * N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = _score_tile(
            za_ptr, zb_ptr, rows, cols, N, D, inv_temp, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
        )
        # (2) j != i and j < 2N; every tile holds a valid j for every valid row except at most the
        # diagonal, and the first tile always has one, so m_i is finite after it (no inf - inf).
        keep = (cols[None, :] < 2 * N) & (cols[None, :] != rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    # (3) the positive pair's score s_{i,p(i)}: the partner of row i is i + N or i - N
    partner = tl.where(rows < N, rows + N, rows - N)
    base = _row_ptrs(za_ptr, zb_ptr, rows, N, D)
    pbase = _row_ptrs(za_ptr, zb_ptr, partner, N, D)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        msk = row_ok[:, None] & (ks[None, :] < D)
        x = tl.load(base[:, None] + ks[None, :], mask=msk, other=0.0).to(tl.float32)
        y = tl.load(pbase[:, None] + ks[None, :], mask=msk, other=0.0).to(tl.float32)
        pos += tl.sum(x * y, axis=1)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(term_ptr + rows, lse - inv_temp * pos, mask=row_ok)


@triton.jit
def _nt_xent_bwd_kernel(
    za_ptr, zb_ptr, lse_ptr, grad_ptr, ga_ptr, gb_ptr, N, D, row_start, row_end, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (i, v): rows row_start + i*BLOCK_M.. of u, features v*BLOCK_DV.. of their gradient.

    (4) dL/du_k = grad * inv_temp / (2N) * (sum_{j != k} W_kj u_j - 2 u_{p(k)}),
        W_kj = exp(s_kj - lse_k) + exp(s_kj - lse_j)   (P_kj + P_jk, using s symmetric).
    """
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < D
    lse_k = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for j0 in range(0, 2 * N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < 2 * N
        s = _score_tile(
            za_ptr, zb_ptr, rows, cols, N, D, inv_temp, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
        )
        lse_j = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)
        w = tl.exp(s - lse_k[:, None]) + tl.exp(s - lse_j[None, :])
        w = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), w, 0.0)
        col_base = _row_ptrs(za_ptr, zb_ptr, cols, N, D)
        v = tl.load(col_base[:, None] + dv[None, :], mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(w, v.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(w.to(v.dtype), v, acc, input_precision=PRECISION)
    partner = tl.where(rows < N, rows + N, rows - N)
    pbase = _row_ptrs(za_ptr, zb_ptr, partner, N, D)
    up = tl.load(pbase[:, None] + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    g = tl.load(grad_ptr).to(tl.float32)
    coef = g * inv_temp / (2.0 * N)
    out = coef * (acc - 2.0 * up.to(tl.float32))
    obase = _row_ptrs(ga_ptr, gb_ptr, rows, N, D)
    tl.store(
        obase[:, None] + dv[None, :], out.to(ga_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :]
    )


def block_sizes(d: int, interpret: bool) -> dict[str, int]:
    """Tile sizes: BLOCK_M x BLOCK_N score tiles, BLOCK_K features per dot, BLOCK_DV gradient columns.

    GPU: 64 x 64 tiles. Interpreter: 32 x 32 (fewer, larger numpy steps are faster there).
    """
    pow2 = max(16, triton.next_power_of_2(d))
    if interpret:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": min(pow2, 128), "BLOCK_DV": min(pow2, 128)}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": min(pow2, 64), "BLOCK_DV": min(pow2, 128)}


def _check(za: torch.Tensor, zb: torch.Tensor) -> None:
    if za.dtype not in TL_DTYPE or zb.dtype != za.dtype:
        raise TypeError(f"za/zb must both be float32, bfloat16 or float16; got {za.dtype} and {zb.dtype}")
    if za.dim() != 2 or zb.shape != za.shape:
        raise ValueError(
            f"za and zb must be [N, D] of one shape; got {tuple(za.shape)} and {tuple(zb.shape)}"
        )


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def nt_xent_fwd_triton(
    za: torch.Tensor, zb: torch.Tensor, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(loss, lse)``.

    Args:
        za, zb: [N, D] L2-normalised views, float32/bfloat16/float16, same device (CUDA, or CPU
            under ``TRITON_INTERPRET=1``).
        inv_temp: 1 / temperature.

    Returns:
        loss: 0-dim float32, the mean over the 2N rows of ``lse_i - s_{i,p(i)}``.
        lse: [2N] float32 per-row log-sum-exp over ``j != i`` of ``s_ij``.
    """
    _check(za, zb)
    za, zb = za.contiguous(), zb.contiguous()
    n, d = za.shape
    lse = torch.empty(2 * n, dtype=torch.float32, device=za.device)
    term = torch.empty(2 * n, dtype=torch.float32, device=za.device)
    interp = interpreting()
    bs = block_sizes(d, interp)
    grid = (triton.cdiv(2 * n, bs["BLOCK_M"]),)
    _nt_xent_fwd_kernel[grid](
        za, zb, lse, term, n, d, float(inv_temp),
        BLOCK_M=bs["BLOCK_M"], BLOCK_N=bs["BLOCK_N"], BLOCK_K=bs["BLOCK_K"],
        UPCAST=interp or za.dtype == torch.float32, PRECISION=_precision(za.dtype),
    )  # fmt: skip
    loss = (term.sum(dtype=torch.float64) / (2 * n)).to(torch.float32)
    return loss, lse


def nt_xent_bwd_triton(
    grad: torch.Tensor,
    za: torch.Tensor,
    zb: torch.Tensor,
    lse: torch.Tensor,
    inv_temp: float,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: ``(grad_za, grad_zb)``, each [N, D] in za's dtype, or an empty tensor when not needed.

    Args:
        grad: one-element float tensor, the loss's incoming gradient (read on the device: no sync).
        za, zb: the forward's inputs. lse: the forward's [2N] float32 output. inv_temp: 1 / tau.
        need_a, need_b: which sides to compute; only their rows are visited.
    """
    _check(za, zb)
    za, zb = za.contiguous(), zb.contiguous()
    n, d = za.shape
    ga = torch.empty_like(za) if need_a else za.new_empty((0,))
    gb = torch.empty_like(zb) if need_b else zb.new_empty((0,))
    if not (need_a or need_b):
        return ga, gb
    row_start, row_end = (0 if need_a else n), (2 * n if need_b else n)
    interp = interpreting()
    bs = block_sizes(d, interp)
    grid = (triton.cdiv(row_end - row_start, bs["BLOCK_M"]), triton.cdiv(d, bs["BLOCK_DV"]))
    g = grad.reshape(1).to(device=za.device, dtype=torch.float32).contiguous()
    _nt_xent_bwd_kernel[grid](
        za, zb, lse.contiguous(), g, ga if need_a else gb, gb if need_b else ga, n, d, row_start, row_end,
        float(inv_temp),
        BLOCK_M=bs["BLOCK_M"], BLOCK_N=bs["BLOCK_N"], BLOCK_K=bs["BLOCK_K"], BLOCK_DV=bs["BLOCK_DV"],
        UPCAST=interp or za.dtype == torch.float32, PRECISION=_precision(za.dtype),
    )  # fmt: skip
    return ga, gb


def hopper_compile_specs() -> list[dict]:
    """Every kernel of this module with concrete signatures, for an ahead-of-time sm_90 compile.

    Returns:
        ``{"name", "fn", "signature", "constexprs", "options"}`` dicts for the forward and the
        backward kernel in float32 and bfloat16 (GPU tile sizes, D = 512), for
        ``triton.compiler.ASTSource(fn, signature, constexprs)``.
    """
    specs = []
    for dtype in (torch.float32, torch.bfloat16):
        ptr = pointer_type(dtype)
        bs = block_sizes(512, interpret=False)
        common = {"UPCAST": dtype == torch.float32, "PRECISION": _precision(dtype)}
        name = dtype_name(dtype)
        fwd_sig = {
            "za_ptr": ptr, "zb_ptr": ptr, "lse_ptr": "*fp32", "term_ptr": "*fp32",
            "N": "i32", "D": "i32", "inv_temp": "fp32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
            "UPCAST": "constexpr", "PRECISION": "constexpr",
        }  # fmt: skip
        specs.append(
            {
                "name": f"nt_xent_fwd_{name}",
                "fn": _nt_xent_fwd_kernel,
                "signature": fwd_sig,
                "constexprs": {k: bs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")} | common,
                "options": {"num_warps": 4},
            }
        )
        bwd_sig = {
            "za_ptr": ptr, "zb_ptr": ptr, "lse_ptr": "*fp32", "grad_ptr": "*fp32", "ga_ptr": ptr,
            "gb_ptr": ptr, "N": "i32", "D": "i32", "row_start": "i32", "row_end": "i32",
            "inv_temp": "fp32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
            "BLOCK_DV": "constexpr", "UPCAST": "constexpr", "PRECISION": "constexpr",
        }  # fmt: skip
        specs.append(
            {
                "name": f"nt_xent_bwd_{name}",
                "fn": _nt_xent_bwd_kernel,
                "signature": bwd_sig,
                "constexprs": dict(bs) | common,
                "options": {"num_warps": 4},
            }
        )
    return specs
