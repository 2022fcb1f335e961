"""Data-parallel purification on ``torch.distributed``: the pieces ``purify`` uses when several
processes (one per GPU, or several CPU processes on gloo) run one CBD job, launched by torchrun.

What "the same run on any number of ranks" means here, and how each piece keeps it:

- ``batch_size`` is the GLOBAL batch: every rank takes ``batch_size // world_size`` images per step
  (``local_batch_size``). ``make_sampler`` returns a ``DistributedSampler`` whose per-epoch
  permutation is the one the single-process sampler uses, so global batch ``k`` holds the same
  images on 1 rank or on N (rank ``r`` takes every N-th index starting at ``r``).
- NT-Xent negatives are global: features are all-gathered, every rank computes the SAME global
  loss. ``gather_with_grad``'s backward sums the incoming gradients over ranks (reduce-scatter =
  all-reduce-sum, then this rank's slice); DDP then averages parameter gradients over ranks, and the
  sum-then-average is exactly the single-process gradient (see ``_GatherWithGrad``).
- BatchNorm statistics are global by default (``sync_bn=True``): torch's ``SyncBatchNorm`` on CUDA,
  and on other devices (CPU/gloo, where ``SyncBatchNorm`` raises "expected input tensor to be on
  GPU") this module's ``GlobalBatchNorm``, which all-gathers per-rank (count, mean, M2) with autograd
  through the gather. ``sync_bn=False`` keeps per-rank statistics (faster, not equivalent to one
  process; DDP then broadcasts rank 0's running statistics at each forward).
- PGD phase: clean anchors are gathered once per batch without gradient (``gather_no_grad``); each
  PGD step all-gathers the adversarial features once (``gather_local_grad``) with the gradient path
  kept only through this rank's own slice and NO backward communication: the step only needs
  ``sign(dL/dx_adv)`` of this rank's own inputs, and every rank holds the full global loss.
- Random starts come from ``cbd_fast.core.rng.per_sample_uniform`` (a pure function of seed, epoch
  and sample index), so a sample's start does not depend on which rank or
  batch it lands in.
- Only ``ctx.is_main`` (rank 0) writes checkpoints, reports and progress bars.
- ``run_guard`` turns an exception on one rank into a stop of every rank (the error is posted to
  the rendezvous store and the process group is torn down so peers blocked in a collective fail
  fast instead of hanging); ``check_config`` makes sure every rank runs the same configuration and
  that the requested op backend can run on every rank.

Everything here is the identity / a no-op when ``ctx.enabled`` is False, so the single-process path
pays nothing.

Launch (one node, 8 GPUs)::

    torchrun --standalone --nproc_per_node=8 -m cbd_fast purify ...      # CLI
    torchrun --standalone --nproc_per_node=8 my_script.py                # calls cbd_fast.purify(...)

Multi-node: the same command on every node with torchrun's c10d rendezvous, e.g.
``torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400
--rdzv_id=JOB -m cbd_fast purify ...``; ``CBD_FAST_DIST_TIMEOUT`` (seconds) bounds how long a
collective may wait for a peer before the run fails.

Sharded models (FSDP) are not supported: the encoder must fit on one device.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from cbd_fast.core.device import resolve_device
from cbd_fast.core.inputs import EpochShuffleSampler

__all__ = [
    "DistContext",
    "init_context",
    "local_batch_size",
    "make_sampler",
    "wrap_model",
    "unwrap_model",
    "attack_module",
    "GlobalBatchNorm",
    "convert_global_bn",
    "revert_global_bn",
    "gather_with_grad",
    "gather_local_grad",
    "RowLayout",
    "row_layout",
    "gather_no_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "check_config",
    "run_guard",
    "shutdown",
    "is_main_process",
    "TIMEOUT_ENV",
]

logger = logging.getLogger("cbd_fast.core.distributed")

#: Environment variable: seconds a collective may wait for a peer (process groups created here).
TIMEOUT_ENV = "CBD_FAST_DIST_TIMEOUT"

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_ERROR_KEY = "cbd_fast/error/"


# ---------------------------------------------------------------------------------------------
# Context
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        enabled: True when the run is data-parallel over a process group; False = one process
            (every helper here is then the identity / a no-op).
        rank: global rank of this process (0 when disabled).
        world_size: number of processes (1 when disabled).
        local_rank: rank on this node (selects the GPU: ``cuda:local_rank``).
        is_main: True on rank 0 only: the one process that writes checkpoints, reports, progress.
        device: the device this rank computes on.
        backend: the process-group backend ("gloo", "nccl") or None when disabled.
        owns_group: True when ``init_context`` created the process group (``shutdown`` destroys it).
    """

    enabled: bool
    rank: int
    world_size: int
    local_rank: int
    is_main: bool
    device: torch.device
    backend: str | None = None
    owns_group: bool = False


def _config_get(config: Any, name: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _pick_device(config: Any, local_rank: int | None) -> torch.device:
    """The rank's device: ``"auto"``/None -> ``cuda:local_rank`` when CUDA is available, else CPU;
    a bare ``"cuda"`` -> ``cuda:local_rank``; anything else as given (``resolve_device``'s rules)."""
    return resolve_device(_config_get(config, "device", "auto"), local_rank=local_rank)


def _timeout() -> datetime.timedelta | None:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds; got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_context(config: Any = None) -> DistContext:
    """Resolve (and if needed create) the process group this run uses.

    Args:
        config: a ``PurifyConfig`` (or any object/dict with ``distributed`` and optionally
            ``device``). ``distributed``:

            - ``"auto"`` (default): data-parallel iff ``torch.distributed`` is initialised with
              world_size > 1, or (extension) the process was started by torchrun with
              ``WORLD_SIZE > 1`` (then the group is created here, as for True);
            - ``True``: data-parallel; if the group is not initialised, create it from the
              torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
              ``MASTER_PORT``): backend nccl on CUDA, gloo on CPU; a timeout from
              ``CBD_FAST_DIST_TIMEOUT`` seconds when set;
            - ``False``: one process, even inside an initialised group.

            ``device``: "auto"/None -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU;
            "cuda" -> ``cuda:LOCAL_RANK``; anything else is used as is.

    Returns:
        The ``DistContext``. On CUDA, ``torch.cuda.set_device(ctx.device)`` has been called.

    Raises:
        ValueError: ``distributed`` is not "auto", True or False.
        RuntimeError: ``distributed=True`` without an initialised group and without the torchrun
            environment variables (names the missing ones and how to launch).
    """
    mode = _config_get(config, "distributed", "auto")
    if isinstance(mode, str):
        mode = mode.lower()
    if not (mode == "auto" or mode is True or mode is False):
        raise ValueError(f"distributed must be 'auto', True or False; got {mode!r}")

    available = dist.is_available()
    initialised = available and dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)

    if mode is False or (mode == "auto" and not initialised and _env_world_size() <= 1):
        return _single(config, local_rank if mode is False else 0)
    if initialised and mode == "auto" and dist.get_world_size() <= 1:
        return _single(config, local_rank)

    owns = False
    if not initialised:
        if not available:
            raise RuntimeError("distributed=True but torch.distributed is not available in this torch build")
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        if missing:
            raise RuntimeError(
                "distributed=True but torch.distributed is not initialised and the torchrun "
                f"environment variables {missing} are missing; launch with "
                "`torchrun --nproc_per_node=N ...` or call torch.distributed.init_process_group() first"
            )
        device = _pick_device(config, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
        timeout = _timeout()
        if timeout is not None:
            kwargs["timeout"] = timeout
        _import_dynamo_first()
        dist.init_process_group(**kwargs)
        owns = True
    else:
        device = _pick_device(config, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(
        enabled=True,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        is_main=rank == 0,
        device=device,
        backend=str(dist.get_backend()),
        owns_group=owns,
    )


def _import_dynamo_first() -> None:
    """Import ``torch._dynamo`` before the process group exists.

    Measured with torch 2.13 (gloo): when ``torch._dynamo`` is first imported *after*
    ``init_process_group`` (purify's modules import it), ``destroy_process_group`` no longer frees
    the group, so its worker threads outlive ``shutdown``. A collective's work object that such a
    thread releases while Python is finalizing then aborts the process ("terminate called without
    an active exception", SIGABRT) after a run that succeeded. Importing it first (about 1.5 s,
    paid by purify anyway) keeps ``destroy_process_group`` effective.
    ``tests/core/test_distributed.py::test_shutdown_stops_the_group_threads`` checks it. A torch
    whose ``torch._dynamo`` cannot be imported has nothing to protect against: it is skipped.
    """
    try:
        import torch._dynamo  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an optional precaution must not stop the run
        logger.debug("torch._dynamo not importable (%s); nothing to import first", exc)


def _single(config: Any, local_rank: int) -> DistContext:
    return DistContext(
        enabled=False,
        rank=0,
        world_size=1,
        local_rank=local_rank,
        is_main=True,
        device=_pick_device(config, None),  # one process: "auto" is the current CUDA device
    )


def is_main_process() -> bool:
    """True unless this process is a rank other than 0 of an initialised process group (for code
    without a ``DistContext``, e.g. the CLI deciding who writes the output files)."""
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if ``init_context`` created it (scripts call this at the end)."""
    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Batch split and sampling
# ---------------------------------------------------------------------------------------------


def local_batch_size(global_batch_size: int, ctx: DistContext) -> int:
    """This rank's share of the global batch.

    Args:
        global_batch_size: ``config.batch_size``, images per optimisation step over ALL ranks.
        ctx: the run's context.

    Returns:
        ``global_batch_size // ctx.world_size``.

    Raises:
        ValueError: not divisible (raised identically on every rank: it depends only on the
            config, which ``check_config`` keeps equal across ranks), or a local batch < 1.
    """
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise TypeError(f"batch_size must be an int; got {type(global_batch_size).__name__}")
    world = ctx.world_size if ctx.enabled else 1
    if global_batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {global_batch_size}")
    if global_batch_size % world != 0:
        raise ValueError(
            f"batch_size (the global batch) must be divisible by the world_size; got batch_size="
            f"{global_batch_size}, world_size={world} (use a multiple of {world}, e.g. "
            f"{max(world, global_batch_size - global_batch_size % world)})"
        )
    return global_batch_size // world


def make_sampler(
    dataset: Any, ctx: DistContext, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> torch.utils.data.Sampler[int]:
    """The sampler purify's DataLoader uses (pass it as ``sampler=``; call ``set_epoch(epoch)``
    at the start of every epoch, and build the loader with ``batch_size=local_batch_size(...)``).

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``).
        ctx: the run's context.
        shuffle: shuffle per epoch (from ``seed + epoch``).
        seed: base seed; equal on every rank (``check_config`` checks the config).
        drop_last: enabled: drop the tail so every rank gets the same number of samples instead
            of padding with repeats (``DistributedSampler``'s rule); ignored for one process.

    Returns:
        Enabled: ``DistributedSampler(dataset, world_size, rank, shuffle, seed, drop_last)``: every
        rank gets the same number of samples (padded by repeating the first indices when
        ``len(dataset)`` is not divisible by world_size, so with ``drop_last=False`` a run equals
        the single-process run only when it is), hence equal-sized k-th batches on every rank,
        which the gathers require. Disabled: ``cbd_fast.core.inputs.EpochShuffleSampler``, the same
        per-epoch permutation.
    """
    if not ctx.enabled:
        return EpochShuffleSampler(len(dataset), seed, shuffle=shuffle)
    return torch.utils.data.distributed.DistributedSampler(
        dataset,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )


# ---------------------------------------------------------------------------------------------
# Feature gathers
# ---------------------------------------------------------------------------------------------


#: The last collectives' work handles (gloo only). A gloo worker thread keeps its own reference to
#: each work until just after running it; if that reference is the last one, the thread frees the
#: work's tensors, which needs the GIL. When the main thread destroys the group at that moment
#: (``destroy_process_group``, or a DDP reducer freed later), it joins the worker threads while
#: holding the GIL: a deadlock (seen about once in 5 two-rank test runs on a loaded 2-core CPU).
#: Holding the last handles here makes the main thread, not a worker, free every work.
#: Each gloo worker holds at most one work, so a few handles are enough.
_RECENT_WORK: collections.deque[Any] = collections.deque(maxlen=8)


def _collective(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run the collective ``fn(*args, **kwargs)`` and wait; keep its handle on gloo (``_RECENT_WORK``)."""
    work = fn(*args, async_op=True, **kwargs)
    work.wait()
    if dist.get_backend() == "gloo":
        _RECENT_WORK.append(work)


def _all_gather_flat(z: torch.Tensor, world: int) -> torch.Tensor:
    """[B, ...] on every rank -> [world * B, ...], rank-major (rank r's rows at r*B:(r+1)*B)."""
    z = z.contiguous()
    out = torch.empty((world * z.shape[0], *z.shape[1:]), dtype=z.dtype, device=z.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _collective(gather, out, z)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather with the exact distributed adjoint.

    Forward: ``Z = [z_0; z_1; ...; z_{W-1}]`` on every rank.
    Backward: rank r receives ``dL_q/dZ`` from its own loss ``L_q`` and must return
    ``d(sum_q L_q)/dz_r = sum_q (dL_q/dZ)[rows of r]``: reduce-scatter(SUM) = all-reduce-sum of the
    incoming gradient followed by this rank's slice, in one collective.

    Why the SUM is right (and dropping it, as some libraries did, is wrong by a factor W): every
    rank computes the same global loss L, so ``sum_q L_q = W * L``; the reduce-scatter gives each
    rank ``W * dL/dz_r``, its parameter gradient is ``W * (contribution of its samples to dL/dtheta)``
    and DDP's AVERAGE over ranks ``(1/W) * sum_r W * contrib_r = dL/dtheta``: exactly one process's
    gradient on the whole batch. Returning only the local slice (no sum) would give ``dL/dtheta / W``.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, world: int, rank: int) -> torch.Tensor:
        ctx.world, ctx.rank, ctx.rows = world, rank, z.shape[0]
        return _all_gather_flat(z, world)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        _collective(scatter, out, grad, op=dist.ReduceOp.SUM)
        return out, None, None


def gather_with_grad(z: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All-gather features for the fine-tune loss (global negatives), differentiable.

    Args:
        z: [B, ...] this rank's features (any float dtype), B equal on every rank.
        ctx: the run's context.

    Returns:
        [world_size * B, ...]: rank r's rows at ``r*B:(r+1)*B``. Backward sums the gradient over
        ranks and returns this rank's slice (see ``_GatherWithGrad`` for why the sum makes DDP's
        averaged gradient exactly the single-process one). Identity when disabled.
    """
    if not ctx.enabled:
        return z
    return _GatherWithGrad.apply(z, ctx.world_size, ctx.rank)


def gather_local_grad(z: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All-gather for a PGD step: one all-gather forward, NO communication in backward.

    The local slice is ``z`` itself (its autograd path kept), the other ranks' rows are constants.
    Every rank holds the same global loss, so ``dL/dz_local`` is already exact here: it is all a
    PGD step needs (``sign(dL/dx_adv)`` of this rank's inputs; no parameter gradients).

    Args:
        z: [B, ...] this rank's adversarial features, B equal on every rank.
        ctx: the run's context.

    Returns:
        [world_size * B, ...], rank-major. Identity when disabled.
    """
    if not ctx.enabled:
        return z
    with torch.no_grad():
        full = _all_gather_flat(z.detach(), ctx.world_size)
    b = z.shape[0]
    lo, hi = ctx.rank * b, (ctx.rank + 1) * b
    return torch.cat([full[:lo], z, full[hi:]], dim=0)


def gather_no_grad(z: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All-gather without gradient (clean anchors, once per batch): [B, ...] -> [world*B, ...]."""
    if not ctx.enabled:
        return z
    with torch.no_grad():
        return _all_gather_flat(z.detach(), ctx.world_size)


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Where each rank's rows of a variable-size part of the batch land in the global part.

    ``adv_fraction < 1`` attacks the images whose own coin says so, so ranks hold different numbers
    of them. The gathers pad every rank's rows to ``width`` (the largest count), gather, and keep the
    valid rows: rank r's rows land at ``offset(r):offset(r) + counts[r]``, rank-major, the same order
    as the equal-size gathers.

    Attributes:
        counts: rows per rank (one entry in one process).
        rank: this rank.
    """

    counts: tuple[int, ...]
    rank: int

    @property
    def total(self) -> int:
        """Rows over all ranks."""
        return sum(self.counts)

    @property
    def offset(self) -> int:
        """Where this rank's rows start in the gathered part."""
        return sum(self.counts[: self.rank])

    @property
    def width(self) -> int:
        return max(self.counts)

    def _valid(self, device: torch.device) -> torch.Tensor:
        w = self.width
        return torch.cat([torch.arange(r * w, r * w + c, device=device) for r, c in enumerate(self.counts)])

    def gather(self, z: torch.Tensor, ctx: DistContext, mode: str) -> torch.Tensor:
        """[counts[rank], ...] -> [total, ...]; ``mode``: ``"grad"`` (``gather_with_grad``: backward
        sums over ranks), ``"local"`` (``gather_local_grad``: only the local rows keep their path) or
        ``"none"`` (constants). Identity when not distributed."""
        if not ctx.enabled:
            return z
        pad = self.width - z.shape[0]
        if pad:
            z = torch.cat([z, z.new_zeros((pad, *z.shape[1:]))])
        return gather(z, ctx, mode).index_select(0, self._valid(z.device))


def gather(z: torch.Tensor, ctx: DistContext, mode: str) -> torch.Tensor:
    """The equal-size gather named by ``mode``: ``"grad"`` (:func:`gather_with_grad`), ``"local"``
    (:func:`gather_local_grad`) or ``"none"`` (:func:`gather_no_grad`)."""
    fn = {"grad": gather_with_grad, "local": gather_local_grad, "none": gather_no_grad}[mode]
    return fn(z, ctx)


def row_layout(rows: int, ctx: DistContext, device: torch.device) -> RowLayout:
    """The :class:`RowLayout` of ``rows`` local rows (one all-gather of a count; a host sync)."""
    if not ctx.enabled:
        return RowLayout((int(rows),), 0)
    n = torch.tensor([int(rows)], dtype=torch.int64, device=device)
    counts = _all_gather_flat(n, ctx.world_size).tolist()
    return RowLayout(tuple(int(c) for c in counts), ctx.rank)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor, identical on every rank; ``t`` itself when not
    distributed). Used by adversaries for decisions on the global batch."""
    if not ctx.enabled:
        return t
    out = t.detach().clone()
    _collective(dist.all_reduce, out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; e.g. epoch statistics for rank 0's report)."""
    if not ctx.enabled:
        return t
    out = t.detach().clone()
    _collective(dist.all_reduce, out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


# ---------------------------------------------------------------------------------------------
# Global BatchNorm and model wrapping
# ---------------------------------------------------------------------------------------------


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are computed over ALL ranks' samples, on any device.

    Drop-in for ``BatchNorm1d/2d/3d`` (same parameters, buffers and state_dict keys). Training mode:

    1. per rank: count ``n_r``, mean ``m_r`` and ``M2_r = sum (x - m_r)^2`` per channel (float32
       or float64 opmath);
    2. all-gather ``[n_r, m_r, M2_r]`` with ``gather_with_grad`` (autograd through the gather, the
       exact distributed adjoint);
    3. combine (Chan et al.): ``N = sum n_r``, ``m = sum n_r m_r / N``,
       ``M2 = sum (M2_r + n_r (m_r - m)^2)`` -- numerically stable, unlike E[x^2] - E[x]^2;
    4. ``y = (x - m) / sqrt(M2/N + eps) * weight + bias``; running statistics get
       ``m`` and the unbiased ``M2/(N-1)``, as ``BatchNorm`` on the whole global batch would.

    Eval mode (with running statistics) is plain ``F.batch_norm``: no communication. Without an
    initialised process group (or with one rank) it is plain BatchNorm.
    """

    _orig_cls: type = nn.BatchNorm2d

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(
                f"GlobalBatchNorm input must have >= 2 dims [N, C, ...]; got shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not bn_training or world == 1:
            return self._plain(x)

        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)

        opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(opmath)
        dims = [0, *range(2, x.dim())]
        n_local = x.numel() // max(x.shape[1], 1)
        # 1. per-rank count, mean and M2 per channel
        mean_r = xc.mean(dim=dims)
        m2_r = (xc - _bcast(mean_r, x.dim())).square().sum(dim=dims)
        stats = torch.cat([mean_r.new_full((1,), float(n_local)), mean_r, m2_r])[None]
        # 2. all-gather with the distributed adjoint
        allstats = _GatherWithGrad.apply(stats, world, dist.get_rank())  # [W, 1 + 2C]
        c = x.shape[1]
        counts, means, m2s = allstats[:, :1], allstats[:, 1 : 1 + c], allstats[:, 1 + c :]
        # 3. Chan's parallel combination
        total = counts.sum()
        mean = (counts * means).sum(dim=0) / total
        m2 = (m2s + counts * (means - mean).square()).sum(dim=0)
        var = m2 / total
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = m2 / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        # 4. normalise and affine
        y = (xc - _bcast(mean, x.dim())) * _bcast(torch.rsqrt(var + self.eps), x.dim())
        if self.affine:
            y = y * _bcast(self.weight.to(opmath), x.dim()) + _bcast(self.bias.to(opmath), x.dim())
        return y.to(x.dtype)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        # nn.BatchNorm's own forward rules (running-stat update with momentum / cumulative average).
        return nn.modules.batchnorm._BatchNorm.forward(self, x)


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _swap_class(bn: nn.Module, new_cls: type) -> nn.Module:
    """A new module of ``new_cls`` sharing ``bn``'s parameters, buffers, hooks and flags."""
    out = new_cls.__new__(new_cls)
    out.__dict__.update(bn.__dict__)  # parameters, buffers, hooks, training flag: the same objects
    return out


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` in ``module`` (in place) by a ``GlobalBatchNorm`` sharing
    its parameters and buffers. Returns ``module`` (or the replacement if ``module`` itself is a BN).
    ``revert_global_bn`` undoes it exactly."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        out = _swap_class(module, GlobalBatchNorm)
        out._orig_cls = type(module)
        return out
    for name, child in module.named_children():
        new = convert_global_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def revert_global_bn(module: nn.Module) -> nn.Module:
    """Undo ``convert_global_bn`` and ``SyncBatchNorm`` conversions done by ``wrap_model``, in place."""
    if isinstance(module, GlobalBatchNorm):
        orig = module.__dict__.pop("_orig_cls", nn.BatchNorm2d)
        return _swap_class(module, orig)
    if isinstance(module, nn.SyncBatchNorm) and "_cbd_orig_cls" in module.__dict__:
        orig = module.__dict__.pop("_cbd_orig_cls")
        module.__dict__.pop("process_group", None)
        return _swap_class(module, orig)
    for name, child in module.named_children():
        new = revert_global_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _convert_sync_bn(module: nn.Module) -> nn.Module:
    """torch's SyncBatchNorm (CUDA), remembering each module's original class for the revert."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        out = _swap_class(module, nn.SyncBatchNorm)
        out.__dict__["_cbd_orig_cls"] = type(module)
        out.process_group = None
        return out
    for name, child in module.named_children():
        new = _convert_sync_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


class _FeatureModule(nn.Module):
    """``forward(x) = feature_fn(encoder, x)``: lets DDP wrap a ``feature_fn`` (e.g. a classifier's
    ``features``) so the reducer sees the forward that produces the loss."""

    def __init__(self, encoder: nn.Module, feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.encoder = encoder
        self.feature_fn = feature_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_fn(self.encoder, x)


def wrap_model(
    encoder: nn.Module,
    ctx: DistContext,
    config: Any = None,
    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Prepare the encoder for data-parallel fine-tuning.

    Args:
        encoder: the module being purified, already on ``ctx.device`` (purify's own copy: its
            BatchNorm children are replaced IN PLACE when ``sync_bn``; ``unwrap_model`` restores
            the original classes, sharing the same parameters and buffers throughout).
        ctx: the run's context.
        config: reads ``sync_bn`` (default True): global BatchNorm statistics (``SyncBatchNorm``
            on CUDA, ``GlobalBatchNorm`` elsewhere); False: per-rank statistics. Optionally
            ``find_unused_parameters`` (default: True iff ``feature_fn`` is given, since a
            classifier's head then gets no gradient).
        feature_fn: optional ``feature_fn(encoder, x) -> features``; when given (and enabled) the
            DDP wrapper's forward calls it, so call the wrapper as ``model(x)`` for features.

    Returns:
        Disabled: ``encoder`` itself (identity). Enabled: a ``DistributedDataParallel`` module;
        ``model(x)`` gives the features. Use ``attack_module(model)`` for PGD forwards (no DDP
        reducer: the attack takes input gradients only) and ``unwrap_model(model)`` at the end.
    """
    if not ctx.enabled:
        return encoder
    if any(p.device != ctx.device for p in encoder.parameters()):
        devs = sorted({str(p.device) for p in encoder.parameters()})
        raise ValueError(f"encoder must be on {ctx.device} before wrap_model; got parameters on {devs}")
    sync_bn = bool(_config_get(config, "sync_bn", True))
    if sync_bn:
        encoder = _convert_sync_bn(encoder) if ctx.device.type == "cuda" else convert_global_bn(encoder)
    inner: nn.Module = encoder if feature_fn is None else _FeatureModule(encoder, feature_fn)
    find_unused = _config_get(config, "find_unused_parameters", None)
    if find_unused is None:
        find_unused = feature_fn is not None
    kwargs: dict[str, Any] = {
        "device_ids": [ctx.device.index] if ctx.device.type == "cuda" else None,
        "find_unused_parameters": bool(find_unused),
    }
    # Global BN keeps running statistics identical on every rank: no per-forward buffer broadcast.
    # Per-rank BN: DDP's default (rank 0's buffers broadcast at each forward). torch >= 2.13 names
    # the switch forward_sync_buffers (broadcast_buffers is deprecated there).
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = not sync_bn
    else:
        kwargs["broadcast_buffers"] = not sync_bn
    ddp = nn.parallel.DistributedDataParallel(inner, **kwargs)
    ddp._cbd_encoder = encoder  # type: ignore[attr-defined]
    return ddp


def attack_module(model: nn.Module) -> nn.Module:
    """The module PGD should call: the encoder/feature module inside DDP (DDP's reducer expects
    parameter gradients after every grad-enabled forward; the attack computes input gradients only).
    Identity for an unwrapped model."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain encoder back from ``wrap_model``: DDP and feature wrappers removed, BatchNorm
    classes restored (same parameter/buffer objects). Identity for an unwrapped model."""
    encoder = getattr(model, "_cbd_encoder", None)
    if encoder is None:
        return revert_global_bn(model)
    return revert_global_bn(encoder)


# ---------------------------------------------------------------------------------------------
# Consistency checks and failure handling
# ---------------------------------------------------------------------------------------------


def _config_items(config: Any) -> dict[str, str]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, dict):
        items = dict(config)
    else:
        items = dict(vars(config))
    out = {}
    for key, value in sorted(items.items()):
        text = repr(value)
        if " at 0x" in text:  # objects without a value repr: compare their type only
            text = f"<{type(value).__module__}.{type(value).__qualname__}>"
        out[str(key)] = text
    return out


def check_config(
    config: Any,
    ctx: DistContext,
    *,
    ops: Sequence[str] = ("nt_xent", "pgd_step"),
    exclude: Sequence[str] = (),
) -> None:
    """Check that every rank runs the same configuration and can run the requested backend.

    One ``all_gather_object`` of (field -> repr) and of this rank's backend verdict. Raises the
    SAME error on every rank, so no rank goes on to hang in a collective the others never enter.

    Args:
        config: the ``PurifyConfig`` (a dataclass; dicts and plain objects work too).
        ctx: the run's context.
        ops: op names whose backend (``config.backend``; None/"auto" = automatic) must resolve on
            ``ctx.device`` via ``cbd_fast.ops.backends.select_backend``.
        exclude: field names allowed to differ across ranks.

    Raises:
        ValueError: fields differ across ranks (names each field and its value per rank).
        RuntimeError: the requested backend cannot run on some rank (names the ranks and why).
    """
    from cbd_fast.ops.backends import select_backend

    requested = _config_get(config, "backend", None)
    if isinstance(requested, str) and requested.lower() == "auto":
        requested = None
    verdict = None
    for op in ops:
        try:
            select_backend(op, ctx.device, requested)
        except (RuntimeError, ValueError) as exc:
            verdict = f"{type(exc).__name__}: {exc}"
            break
    items = {k: v for k, v in _config_items(config).items() if k not in set(exclude)}
    if not ctx.enabled:
        if verdict is not None:
            raise RuntimeError(verdict)
        return
    digest = hashlib.sha256(repr(sorted(items.items())).encode()).hexdigest()
    mine = {"digest": digest, "items": items, "backend": verdict}
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if len({e["digest"] for e in everyone}) > 1:
        keys = sorted(set().union(*(e["items"].keys() for e in everyone)))
        diffs = []
        for key in keys:
            values = [e["items"].get(key, "<missing>") for e in everyone]
            if len(set(values)) > 1:
                per_rank = ", ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
                diffs.append(f"{key} ({per_rank})")
        raise ValueError("config must be the same on every rank; these fields differ: " + "; ".join(diffs))
    bad = [(r, e["backend"]) for r, e in enumerate(everyone) if e["backend"] is not None]
    if bad:
        raise RuntimeError(
            f"backend {requested!r} cannot run on every rank: "
            + "; ".join(f"rank {r}: {msg}" for r, msg in bad)
        )


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # private API: best effort only
        return None


def _peer_errors(ctx: DistContext) -> list[str]:
    store = _store()
    if store is None:
        return []
    found = []
    for r in range(ctx.world_size):
        if r == ctx.rank:
            continue
        key = f"{_ERROR_KEY}{r}"
        try:
            if store.check([key]):
                found.append(store.get(key).decode(errors="replace"))
        except Exception:
            break
    return found


def _post_error(ctx: DistContext, exc: BaseException) -> None:
    store = _store()
    if store is None:
        return
    with contextlib.suppress(Exception):
        store.set(f"{_ERROR_KEY}{ctx.rank}", f"rank {ctx.rank} failed: {type(exc).__name__}: {exc}"[:4000])


def _abort_group() -> None:
    """Tear the default group down so peers blocked in a collective with us fail now."""
    # The kept work handles hold the gloo context (its connections) alive: release them first so
    # that destroying the group closes the connections. On this error path the last collective
    # finished long ago, so no gloo worker still holds a work (the race ``_RECENT_WORK`` avoids).
    _RECENT_WORK.clear()
    try:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        backend = str(dist.get_backend()) if dist.is_initialized() else ""
        if abort is not None and backend == "nccl":
            abort()
        elif dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # never mask the original error
        logger.debug("aborting the process group failed: %s", exc)


@contextlib.contextmanager
def run_guard(ctx: DistContext) -> Iterator[None]:
    """Make a failure on one rank stop every rank, with the error visible.

    On an exception inside the block this rank (1) posts ``"rank R failed: <error>"`` to the
    rendezvous store, (2) tears down the process group, so peers blocked in a collective with it
    get an error at once instead of waiting for the timeout (gloo: "Connection closed by peer";
    NCCL: the communicator is aborted), and (3) re-raises. A rank whose collective failed because a
    peer went away raises ``RuntimeError("rank R stopped because rank Q failed: ...")`` chained to
    the collective's error. The group is unusable afterwards (a later purify creates a new one only
    if ``init_context`` created the first). Under torchrun the failing process then exits non-zero
    and torchrun stops the others; as a last resort every collective is bounded by the group's
    timeout (``CBD_FAST_DIST_TIMEOUT`` for groups made by ``init_context``).

    Disabled context: a plain pass-through.
    """
    if not ctx.enabled:
        yield
        return
    try:
        yield
    except BaseException as exc:
        peers = _peer_errors(ctx)
        if peers and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            _abort_group()
            raise RuntimeError(f"rank {ctx.rank} stopped because " + " | ".join(peers)) from exc
        _post_error(ctx, exc)
        logger.error("rank %d failed: %s: %s", ctx.rank, type(exc).__name__, exc)
        _abort_group()
        raise
