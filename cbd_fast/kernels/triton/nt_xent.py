"""Triton kernels of the fused NT-Xent loss (the ``triton`` backend of ``cbd_fast.ops.nt_xent``).

Inputs are the L2-normalised views ``za, zb`` [N, D]; the launchers stack them into one contiguous
``u = [za; zb]`` [2N, D] (one copy of the inputs: per-element pointer selects between two tensors
cost the kernels ~80 registers per thread and made them spill), ``s_ij = inv_temp * <u_i, u_j>``;
nothing of size 2N x 2N is stored.

Forward, two launches:

1. ``_fwd_partial_kernel``, grid (row tiles, column splits): program (r, c) runs over the column
   tiles of split c for the BLOCK_M rows of tile r and keeps, per row, a running maximum ``m`` and
   sum ``l = sum_j exp(s_ij - m)`` over ``j != i`` (flash-style), plus the positive pair's score
   ``s_{i,p(i)}`` when its column falls in the split. Splitting the columns is what fills the GPU
   when 2N / BLOCK_M row tiles are fewer than its multiprocessors (``_splits``).
2. ``_fwd_merge_kernel``: per row, the log-sum-exp merge of the splits' partials,
   ``M = max_c m_c``, ``lse = M + log(sum_c l_c exp(m_c - M))``, and ``term = lse - s_{i,p(i)}``.
   The loss is the float64 mean of ``term``.

Backward, one or two launches: ``_bwd_kernel``, grid (row tiles, gradient-column tiles, column
splits), recomputes score tiles and accumulates ``sum_j W_kj u_j`` for its rows and gradient
columns, ``W_kj = exp(s_kj - lse_k) + exp(s_kj - lse_j)``; with one split it writes the gradient
itself, with several it writes float32 partials that ``_bwd_reduce_kernel`` sums in a fixed order
(deterministic, no atomics).

Dot products: ``tl.dot`` with float32 accumulation, on bfloat16/float16 tiles as stored for 16-bit
inputs (tensor cores; the ``W`` tile is rounded to the input dtype for ``W @ u``), in full float32
(``input_precision="ieee"``) for float32 inputs. Under ``TRITON_INTERPRET=1`` (CPU tensors), whose
16-bit ``tl.dot`` is wrong, the operands are upcast to float32 first: the ``UPCAST`` constexpr in
``_mma`` is the only difference between the interpreter and the GPU code.

Importing this module imports Triton; on CPU tensors set ``TRITON_INTERPRET=1`` before importing it.
``hopper_compile_specs()`` lists every ``@triton.jit`` kernel here with concrete signatures so that
``scripts/check_triton_hopper.py`` can compile them for sm_90 without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cbd_fast.kernels.triton._utils import (
    TL_DTYPE,
    device_guard,
    dtype_name,
    interpreting,
    pointer_type,
    sm_count,
)

__all__ = ["nt_xent_fwd_triton", "nt_xent_bwd_triton", "hopper_compile_specs", "block_sizes"]

#: Upper bound on the backward's float32 split workspace (splits x rows x D x 4 bytes).
WORKSPACE_BYTES = 256 * 2**20


# ---- device helpers -------------------------------------------------------------------------------


@triton.jit
def _rows_of(u_ptr, rows, D):
    """Base pointers of rows of u [2N, D] (64-bit offsets: 2N * D may pass 2^31)."""
    return u_ptr + rows.to(tl.int64) * D


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, float32 accumulation. GPU: a, b as given (16-bit: tensor cores; float32 with
    PRECISION). Interpreter (UPCAST): float32 operands, the interpreter's 16-bit dot being wrong."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _score_tile(
    u_ptr, row_base, row_ok, cols, N, D, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """(1) s_ij = inv_temp * <u_i, u_j> for a [BLOCK_M, BLOCK_N] tile; rows given by their bases."""
    col_base = _rows_of(u_ptr, cols, D)
    col_ok = cols < 2 * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(row_base[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(col_base[:, None] + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(x, tl.trans(y), acc, UPCAST, PRECISION)
    return acc * inv_temp


# ---- forward ----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def _fwd_partial_kernel(
    u_ptr, m_ptr, l_ptr, pos_ptr, N, D, inv_temp, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (r, c): partial (m, l, pos) of rows r*BLOCK_M.. over the column tiles of split c.

    Writes m_ptr/l_ptr/pos_ptr[c, i] (float32 [splits, 2N]): m = max_j s_ij, l = sum_j exp(s_ij - m)
    over the split's columns j != i (m = -inf, l = 0 when it has none), pos = s_{i,p(i)} if p(i) is
    one of the split's columns, else 0.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    two_n = 2 * N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < two_n
    row_base = _rows_of(u_ptr, rows, D)
    partner = tl.where(rows < N, rows + N, rows - N)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    j_lo = pid_s * tiles_per_split * BLOCK_N
    j_hi = tl.minimum(j_lo + tiles_per_split * BLOCK_N, two_n)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = _score_tile(
            u_ptr, row_base, row_ok, cols, N, D, inv_temp, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
        )
        # (3) the positive pair's score, from the same tile (p(i) = i + N or i - N)
        pos += tl.sum(tl.where(cols[None, :] == partner[:, None], s, 0.0), axis=1)
        # (2) online log-sum-exp over j != i, j < 2N. A row may have no valid column yet (a split
        # holding only its diagonal): its reference point stays 0, so no inf - inf appears.
        s = tl.where((cols[None, :] < two_n) & (cols[None, :] != rows[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), axis=1)
        m_i = m_new
    out = pid_s.to(tl.int64) * two_n + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)
    tl.store(pos_ptr + out, pos, mask=row_ok)


@triton.jit(do_not_specialize=["TWO_N", "splits"])
def _fwd_merge_kernel(m_ptr, l_ptr, pos_ptr, lse_ptr, term_ptr, TWO_N, splits, BLOCK: tl.constexpr):
    """Per row: lse = M + log(sum_c l_c exp(m_c - M)), M = max_c m_c; term = lse - sum_c pos_c."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < TWO_N
    m_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for c in range(0, splits):
        m_c = tl.load(m_ptr + (rows.to(tl.int64) + c * TWO_N), mask=ok, other=float("-inf"))
        m_max = tl.maximum(m_max, m_c)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    pos = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, splits):
        off = rows.to(tl.int64) + c * TWO_N  # splits * 2N < 2^31: splits > 1 only for small 2N
        m_c = tl.load(m_ptr + off, mask=ok, other=float("-inf"))
        total += tl.load(l_ptr + off, mask=ok, other=0.0) * tl.exp(m_c - m_ref)
        pos += tl.load(pos_ptr + off, mask=ok, other=0.0)
    lse = m_ref + tl.log(tl.where(ok, total, 1.0))  # masked rows: no log(0)
    tl.store(lse_ptr + rows, lse, mask=ok)
    tl.store(term_ptr + rows, lse - pos, mask=ok)


# ---- backward ---------------------------------------------------------------------------------------


@triton.jit
def _side_rows(pid, side_lo, tiles_per_side, N, BLOCK: tl.constexpr):
    """Rows of u handled by row program ``pid``: tiles never straddle the two views, so every
    program works on one side (0: za's rows 0..N-1, 1: zb's rows N..2N-1). Returns (side, local row
    indices within the side, their validity, rows of u)."""
    side = side_lo + pid // tiles_per_side
    local = (pid % tiles_per_side) * BLOCK + tl.arange(0, BLOCK)
    return side, local, local < N, side * N + local


@triton.jit
def _bwd_finish(u_ptr, ga_ptr, gb_ptr, grad_ptr, acc, side, local, row_ok, dv, dv_ok, N, D, inv_temp):
    """(4) dL/du_k = grad * inv_temp / (2N) * (acc_k - 2 u_{p(k)}) for the rows ``local`` of view
    ``side``, stored in the input dtype into ga (side 0) or gb (side 1)."""
    partner = (1 - side) * N + local
    msk = row_ok[:, None] & dv_ok[None, :]
    up = tl.load(_rows_of(u_ptr, partner, D)[:, None] + dv[None, :], mask=msk, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr).to(tl.float32)
    coef = g * inv_temp / (2.0 * N)
    out = (coef * (acc - 2.0 * up)).to(ga_ptr.dtype.element_ty)
    out_ptr = tl.where(side == 0, ga_ptr, gb_ptr)
    tl.store(_rows_of(out_ptr, local, D)[:, None] + dv[None, :], out, mask=msk)


@triton.jit(do_not_specialize=["N", "side_lo", "tiles_per_side", "tiles_per_split"])
def _bwd_kernel(
    u_ptr, lse_ptr, grad_ptr, ga_ptr, gb_ptr, ws_ptr,
    N, D, side_lo, tiles_per_side, inv_temp, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr,
):  # fmt: skip
    """Program (r, v, c): row tile r of the views asked for (from view ``side_lo``, ``tiles_per_side``
    tiles per view), gradient columns v*BLOCK_DV.., split c of the columns.

    acc_k = sum_{j in split, j != k} W_kj u_j with W_kj = exp(s_kj - lse_k) + exp(s_kj - lse_j)
    (P_kj + P_jk, s symmetric). DIRECT (one split): the gradient is finished and stored here;
    otherwise acc goes to ws_ptr[c, k - side_lo * N, :] (float32 [splits, rows asked for, D]).
    """
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_s = tl.program_id(2)
    two_n = 2 * N
    side, local, row_ok, rows = _side_rows(pid_m, side_lo, tiles_per_side, N, BLOCK_M)
    row_base = _rows_of(u_ptr, rows, D)
    dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < D
    lse_k = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    j_lo = pid_s * tiles_per_split * BLOCK_N
    j_hi = tl.minimum(j_lo + tiles_per_split * BLOCK_N, two_n)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < two_n
        s = _score_tile(
            u_ptr, row_base, row_ok, cols, N, D, inv_temp, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
        )
        lse_j = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)
        w = tl.exp(s - lse_k[:, None]) + tl.exp(s - lse_j[None, :])
        w = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), w, 0.0)
        v = tl.load(
            _rows_of(u_ptr, cols, D)[:, None] + dv[None, :], mask=col_ok[:, None] & dv_ok[None, :], other=0.0
        )
        acc = _mma(w.to(v.dtype), v, acc, UPCAST, PRECISION)
    if DIRECT:
        _bwd_finish(u_ptr, ga_ptr, gb_ptr, grad_ptr, acc, side, local, row_ok, dv, dv_ok, N, D, inv_temp)
    else:
        n_rows = (tl.num_programs(0) // tiles_per_side) * N  # rows of the views asked for
        ws_rows = pid_s * n_rows + (side - side_lo) * N + local
        tl.store(
            _rows_of(ws_ptr, ws_rows, D)[:, None] + dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :]
        )


@triton.jit(do_not_specialize=["N", "side_lo", "tiles_per_side", "splits"])
def _bwd_reduce_kernel(
    u_ptr, ws_ptr, grad_ptr, ga_ptr, gb_ptr, N, D, side_lo, tiles_per_side, inv_temp, splits,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Sums the backward's split partials in split order, then finishes the gradient (_bwd_finish)."""
    side, local, row_ok, rows = _side_rows(tl.program_id(0), side_lo, tiles_per_side, N, BLOCK_R)
    dv = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dv_ok = dv < D
    n_rows = (tl.num_programs(0) // tiles_per_side) * N
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for c in range(0, splits):
        ws_rows = c * n_rows + (side - side_lo) * N + local
        acc += tl.load(
            _rows_of(ws_ptr, ws_rows, D)[:, None] + dv[None, :],
            mask=row_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
    _bwd_finish(u_ptr, ga_ptr, gb_ptr, grad_ptr, acc, side, local, row_ok, dv, dv_ok, N, D, inv_temp)


# ---- launch configuration -----------------------------------------------------------------------------


def block_sizes(d: int, dtype: torch.dtype, interpret: bool) -> dict[str, dict[str, int]]:
    """Tile sizes and launch options of each kernel for feature dimension ``d`` and ``dtype``.

    GPU, bfloat16/float16 (tensor cores): forward 128 x 64 score tiles, 64 features per dot,
    8 warps, 3 pipeline stages; backward 64 x 64 score tiles and 256 gradient columns per
    program (64 / 128 for D <= 64 / 128), 8 warps. float32 (``ieee`` dots on the FMA units):
    64 x 64 forward tiles, 32 features, 8 warps (4 spill); backward 64 x 32 tiles and 64 gradient
    columns, 4 warps. None of these spills registers on sm_90 (``scripts/check_triton_hopper.py``
    fails when one does). Few distinct configurations on purpose: each one is a separate JIT
    compile (the launchers also keep N and the split counts out of Triton's specialisation).
    Interpreter: 32 x 32 tiles, wide feature chunks (fewer, larger numpy steps).

    Returns:
        ``{"fwd": {...}, "bwd": {...}, "merge": {...}, "reduce": {...}}``, each with the kernel's
        constexpr block sizes plus ``num_warps`` and ``num_stages``.
    """
    pow2 = max(16, triton.next_power_of_2(d))
    reduce = {"BLOCK_R": 32, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}
    if interpret:
        fwd = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": min(pow2, 128), "num_warps": 4, "num_stages": 1}
        bwd = dict(fwd, BLOCK_DV=min(pow2, 128))
        reduce["BLOCK_D"] = min(pow2, 128)
    elif dtype == torch.float32:
        fwd = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
        bwd = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_DV": 64, "num_warps": 4, "num_stages": 2}
    else:
        fwd = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
        dv = 64 if d <= 64 else (128 if d <= 128 else 256)
        bwd = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_DV": dv, "num_warps": 8, "num_stages": 2}
    return {
        "fwd": fwd,
        "bwd": bwd,
        "merge": {"BLOCK": 256, "num_warps": 4, "num_stages": 1},
        "reduce": reduce,
    }


def _splits(programs: int, col_tiles: int, sms: int, cap: int | None = None) -> tuple[int, int]:
    """``(splits, tiles_per_split)``: how many ranges the column tiles are cut into.

    Only when the programs without a split would not fill one wave of ``sms`` multiprocessors, the
    columns are split so that about two programs per multiprocessor run; never more splits than
    column tiles (or than ``cap``), and no empty split.
    """
    want = 1 if programs >= sms else triton.cdiv(2 * sms, max(programs, 1))
    splits = max(1, min(want, col_tiles, cap if cap is not None else col_tiles))
    per = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, per), per


def _check(za: torch.Tensor, zb: torch.Tensor) -> None:
    if za.dtype not in TL_DTYPE or zb.dtype != za.dtype:
        raise TypeError(f"za/zb must both be float32, bfloat16 or float16; got {za.dtype} and {zb.dtype}")
    if za.dim() != 2 or zb.shape != za.shape:
        raise ValueError(
            f"za and zb must be [N, D] of one shape; got {tuple(za.shape)} and {tuple(zb.shape)}"
        )
    if za.device != zb.device:
        raise ValueError(f"za and zb must be on one device; got {za.device} and {zb.device}")


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: full float32 for float32 tiles (16-bit tiles ignore it)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _opts(cfg: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Split a ``block_sizes`` entry into constexprs and launch options."""
    launch = {k: cfg[k] for k in ("num_warps", "num_stages")}
    return {k: v for k, v in cfg.items() if k not in launch}, launch


# ---- launchers ----------------------------------------------------------------------------------------


def nt_xent_fwd_triton(
    za: torch.Tensor, zb: torch.Tensor, inv_temp: float, *, splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(loss, lse)``.

    Args:
        za, zb: [N, D] L2-normalised views, float32/bfloat16/float16, same device (CUDA, or CPU
            under ``TRITON_INTERPRET=1``). Launched under a guard of their device.
        inv_temp: 1 / temperature.
        splits: force this many column splits (tests); None chooses from the multiprocessor count.

    Returns:
        loss: 0-dim float32, the mean over the 2N rows of ``lse_i - s_{i,p(i)}``.
        lse: [2N] float32 per-row log-sum-exp over ``j != i`` of ``s_ij``.
    """
    _check(za, zb)
    n, d = za.shape
    two_n = 2 * n
    interp = interpreting()
    cfg = block_sizes(d, za.dtype, interp)
    consts, launch = _opts(cfg["fwd"])
    row_tiles = triton.cdiv(two_n, consts["BLOCK_M"])
    col_tiles = triton.cdiv(two_n, consts["BLOCK_N"])
    if splits is None:
        n_split, per = _splits(row_tiles, col_tiles, sm_count(za.device))
    else:
        per = triton.cdiv(col_tiles, max(1, min(splits, col_tiles)))
        n_split = triton.cdiv(col_tiles, per)
    with device_guard(za):
        u = torch.cat([za, zb], dim=0)  # [2N, D] contiguous
        part = torch.empty((3, n_split, two_n), dtype=torch.float32, device=za.device)
        lse = torch.empty(two_n, dtype=torch.float32, device=za.device)
        term = torch.empty(two_n, dtype=torch.float32, device=za.device)
        _fwd_partial_kernel[(row_tiles, n_split)](
            u, part[0], part[1], part[2], n, d, float(inv_temp), per,
            UPCAST=interp, PRECISION=_precision(za.dtype), **consts, **launch,
        )  # fmt: skip
        mconsts, mlaunch = _opts(cfg["merge"])
        _fwd_merge_kernel[(triton.cdiv(two_n, mconsts["BLOCK"]),)](
            part[0], part[1], part[2], lse, term, two_n, n_split, **mconsts, **mlaunch
        )
        loss = (term.sum(dtype=torch.float64) / two_n).to(torch.float32)
    return loss, lse


def nt_xent_bwd_triton(
    grad: torch.Tensor,
    za: torch.Tensor,
    zb: torch.Tensor,
    lse: torch.Tensor,
    inv_temp: float,
    need_a: bool,
    need_b: bool,
    *,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: ``(grad_za, grad_zb)``, each [N, D] in za's dtype, or an empty tensor when not needed.

    Args:
        grad: one-element float tensor, the loss's incoming gradient (read on the device: no sync).
        za, zb: the forward's inputs. lse: the forward's [2N] float32 output. inv_temp: 1 / tau.
        need_a, need_b: which sides to compute; only their rows are visited.
        splits: force this many column splits (tests); None chooses from the multiprocessor count
            (bounded by ``WORKSPACE_BYTES`` of float32 partials).
    """
    _check(za, zb)
    n, d = za.shape
    two_n = 2 * n
    ga = torch.empty_like(za) if need_a else za.new_empty((0,))
    gb = torch.empty_like(zb) if need_b else zb.new_empty((0,))
    if not (need_a or need_b):
        return ga, gb
    side_lo, sides = (0 if need_a else 1), int(need_a) + int(need_b)
    n_rows = sides * n
    interp = interpreting()
    cfg = block_sizes(d, za.dtype, interp)
    consts, launch = _opts(cfg["bwd"])
    per_side = triton.cdiv(n, consts["BLOCK_M"])
    row_tiles = sides * per_side
    dv_tiles = triton.cdiv(d, consts["BLOCK_DV"])
    col_tiles = triton.cdiv(two_n, consts["BLOCK_N"])
    if splits is None:
        cap = max(1, WORKSPACE_BYTES // (4 * n_rows * d))
        n_split, per = _splits(row_tiles * dv_tiles, col_tiles, sm_count(za.device), cap)
    else:
        per = triton.cdiv(col_tiles, max(1, min(splits, col_tiles)))
        n_split = triton.cdiv(col_tiles, per)
    out_a, out_b = (ga if need_a else gb), (gb if need_b else ga)
    with device_guard(za):
        u = torch.cat([za, zb], dim=0)  # [2N, D] contiguous
        g = grad.reshape(1).to(device=za.device, dtype=torch.float32).contiguous()
        lse = lse.to(device=za.device, dtype=torch.float32).contiguous()
        direct = n_split == 1
        ws = g if direct else torch.empty((n_split, n_rows, d), dtype=torch.float32, device=za.device)
        _bwd_kernel[(row_tiles, dv_tiles, n_split)](
            u, lse, g, out_a, out_b, ws, n, d, side_lo, per_side, float(inv_temp), per,
            UPCAST=interp, PRECISION=_precision(za.dtype), DIRECT=direct, **consts, **launch,
        )  # fmt: skip
        if not direct:
            rconsts, rlaunch = _opts(cfg["reduce"])
            r_side = triton.cdiv(n, rconsts["BLOCK_R"])
            grid = (sides * r_side, triton.cdiv(d, rconsts["BLOCK_D"]))
            _bwd_reduce_kernel[grid](
                u, ws, g, out_a, out_b, n, d, side_lo, r_side, float(inv_temp), n_split,
                **rconsts, **rlaunch,
            )  # fmt: skip
    return ga, gb


# ---- ahead-of-time compile specs ----------------------------------------------------------------------


def hopper_compile_specs() -> list[dict]:
    """Every kernel of this module with concrete signatures, for an ahead-of-time sm_90 compile.

    D = 512 (the largest tiles: every D > 128 uses them) and, for the bfloat16 backward, D = 128
    and 64 (its smaller gradient-column tiles); GPU block sizes, pointers and D marked 16-byte
    aligned / divisible by 16 as Triton specialises them at run time.

    Returns:
        ``{"name", "fn", "signature", "constexprs", "options", "aligned", "ptx_contains"}`` dicts
        (``ptx_contains``: instructions the PTX must hold, e.g. warpgroup MMA): the forward
        partial and the backward (both variants) kernels and the reduce kernel in float32, bfloat16
        and float16, and the dtype-independent merge kernel, for
        ``triton.compiler.ASTSource(fn, signature, constexprs)``.
    """
    d = 512
    specs = []
    for dtype in TL_DTYPE:
        ptr = pointer_type(dtype)
        name = dtype_name(dtype)
        cfg = block_sizes(d, dtype, interpret=False)
        common = {"UPCAST": False, "PRECISION": _precision(dtype)}
        # 16-bit score and W @ u tiles must run on Hopper's tensor cores (warpgroup MMA)
        tensor_cores = [] if dtype == torch.float32 else ["wgmma.mma_async"]
        consts, launch = _opts(cfg["fwd"])
        specs.append(
            {
                "name": f"nt_xent_fwd_partial_{name}",
                "fn": _fwd_partial_kernel,
                "signature": {
                    "u_ptr": ptr,
                    "m_ptr": "*fp32",
                    "l_ptr": "*fp32",
                    "pos_ptr": "*fp32",
                    "N": "i32",
                    "D": "i32",
                    "inv_temp": "fp32",
                    "tiles_per_split": "i32",
                    **{k: "constexpr" for k in (*consts, *common)},
                },  # fmt: skip
                "constexprs": consts | common,
                "options": launch,
                "aligned": ["u_ptr", "m_ptr", "l_ptr", "pos_ptr", "D"],
                "ptx_contains": tensor_cores,
            }
        )
        # the backward's gradient-column tile depends on D: 256 (D > 128), and 64 / 128 in bfloat16
        bwd_dims = (512, 128, 64) if dtype == torch.bfloat16 else (512,)
        for dim, direct in ((dim, direct) for dim in bwd_dims for direct in (True, False)):
            consts, launch = _opts(block_sizes(dim, dtype, interpret=False)["bwd"])
            suffix = "" if dim == d else f"_d{dim}"
            specs.append(
                {
                    "name": f"nt_xent_bwd_{'direct' if direct else 'split'}_{name}{suffix}",
                    "fn": _bwd_kernel,
                    "signature": {
                        "u_ptr": ptr,
                        "lse_ptr": "*fp32",
                        "grad_ptr": "*fp32",
                        "ga_ptr": ptr,
                        "gb_ptr": ptr,
                        "ws_ptr": "*fp32",
                        "N": "i32",
                        "D": "i32",
                        "side_lo": "i32",
                        "tiles_per_side": "i32",
                        "inv_temp": "fp32",
                        "tiles_per_split": "i32",
                        **{k: "constexpr" for k in (*consts, *common, "DIRECT")},
                    },  # fmt: skip
                    "constexprs": consts | common | {"DIRECT": direct},
                    "options": launch,
                    "aligned": ["u_ptr", "lse_ptr", "ga_ptr", "gb_ptr", "ws_ptr", "D"],
                    "ptx_contains": tensor_cores,
                }
            )
        consts, launch = _opts(cfg["reduce"])
        specs.append(
            {
                "name": f"nt_xent_bwd_reduce_{name}",
                "fn": _bwd_reduce_kernel,
                "signature": {
                    "u_ptr": ptr,
                    "ws_ptr": "*fp32",
                    "grad_ptr": "*fp32",
                    "ga_ptr": ptr,
                    "gb_ptr": ptr,
                    "N": "i32",
                    "D": "i32",
                    "side_lo": "i32",
                    "tiles_per_side": "i32",
                    "inv_temp": "fp32",
                    "splits": "i32",
                    **{k: "constexpr" for k in consts},
                },  # fmt: skip
                "constexprs": consts,
                "options": launch,
                "aligned": ["u_ptr", "ws_ptr", "ga_ptr", "gb_ptr", "D"],
            }
        )
    consts, launch = _opts(block_sizes(d, torch.bfloat16, interpret=False)["merge"])
    specs.append(
        {
            "name": "nt_xent_fwd_merge",
            "fn": _fwd_merge_kernel,
            "signature": {
                "m_ptr": "*fp32",
                "l_ptr": "*fp32",
                "pos_ptr": "*fp32",
                "lse_ptr": "*fp32",
                "term_ptr": "*fp32",
                "TWO_N": "i32",
                "splits": "i32",
                "BLOCK": "constexpr",
            },  # fmt: skip
            "constexprs": consts,
            "options": launch,
            "aligned": ["m_ptr", "l_ptr", "pos_ptr", "lse_ptr", "term_ptr"],
        }
    )
    return specs
