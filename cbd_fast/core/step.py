"""One CBD step on one batch: clean anchors, the adversary, then one fine-tune update.

Per batch of unlabeled images ``x`` [B, C, H, W]:

1. clean anchors ``c = f(x)`` once, without gradient, in eval mode, gathered over ranks;
2. the adversary finds ``x_adv`` (input-only gradients, eval mode) that pushes ``f(x_adv)`` away
   from ``c``;
3. one forward of ``[x_adv; x; extra clean views]`` in fine-tune mode and one optimiser step on
   ``NTXent(f(x_adv), f(x)) + clean_weight * clean_term`` (pulling plus keeping clean behaviour),
   the gradient passed through the spike guard first. With the head term on and a known head ``h``
   the loss also holds ``KL(h(f0(x)) || h(f(x_adv)))`` (:func:`_head_term`).

With ``free_replays`` = m (:func:`_free_step`) the batch is instead replayed m times, each replay one
forward + backward of ``[x_adv; x]`` that updates the weights and takes the adversary's next ascent
step from the same backward; the anchors come from that forward.

Scalars stay on the device (no host sync), except ``nonfinite="skip"`` which must decide per batch,
and on the CPU, where a host read is free and a non-finite loss stops before the update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cbd_fast.core import distributed as dist
from cbd_fast.core.adversaries import AttackInputs
from cbd_fast.core.adversaries.search import TriggerSearch
from cbd_fast.core.clean_terms import CleanTermInputs, augment
from cbd_fast.core.modes import eval_mode, is_batchnorm
from cbd_fast.core.prepare import Run
from cbd_fast.core.rng import per_sample_uniform
from cbd_fast.ops.nt_xent import nt_xent

__all__ = ["cbd_step", "adversarial_rows", "NonFiniteLoss", "HISTORY_TERMS"]

#: the per-step losses the loop averages into the history
HISTORY_TERMS = ("loss", "loss_pull", "loss_clean", "attack_loss")
#: ``per_sample_uniform`` stream of the attacked-row coin (``adv_fraction``)
_ADV_STREAM = 21


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN/Inf under ``nonfinite="stop"`` (raised before the update on the CPU)."""


def _set_finetune_mode(run: Run) -> None:
    run.model.train()
    if run.config.bn_policy in ("eval", "frozen"):
        for m in run.model.modules():
            if is_batchnorm(m):
                m.eval()


def _reference_features(
    run: Run, x: torch.Tensor, indices: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The frozen original's features as a no-grad float32 function (None without a reference);
    its features of the batch ``x`` itself come from the run's reference cache, or are computed once
    per step however often asked for."""
    ref = run.reference
    if ref is None:
        return None
    memo: dict[str, torch.Tensor] = {}
    cache = run.reference_cache

    def call(images: torch.Tensor) -> torch.Tensor:
        if images is x and "x" in memo:
            return memo["x"]
        if images is x and cache is not None:
            out = cache.lookup(indices)
        else:
            with torch.no_grad(), run.ctx.autocast():
                out = ref(images).float()
        if images is x:
            memo["x"] = out
        return out

    return call


def adversarial_rows(config: Any, indices: torch.Tensor, epoch: int) -> torch.Tensor | None:
    """[m] int64 positions of the batch that are attacked (``config.adv_fraction``), or None: all.

    Each image's own uniform number of (seed, epoch, index) decides, so the set does not depend on
    the batch's composition or on how it is split over ranks.
    """
    if config.adv_fraction >= 1.0:
        return None
    u = per_sample_uniform(indices, (), seed=config.seed, epoch=epoch, stream=_ADV_STREAM)
    return (u < config.adv_fraction).nonzero().squeeze(1)


def _pull_target(
    kind: str,
    z_clean: torch.Tensor,
    reference: Callable[[torch.Tensor], torch.Tensor] | None,
    x: torch.Tensor,
    take: Callable[[torch.Tensor], torch.Tensor],
    gather: Callable[[torch.Tensor, str], torch.Tensor],
) -> torch.Tensor:
    """[M_global, D] the features the adversarial ones are pulled to (``config.pull_target``);
    ``take`` selects the attacked rows of a [B, D] tensor, ``gather`` gathers them over ranks."""
    if kind == "clean":  # the paper's: gradient through both views
        return gather(take(z_clean), "grad")
    if kind == "clean_detached":
        return gather(take(z_clean.detach()), "none")
    assert reference is not None  # "original": prepare_run keeps the frozen original for it
    return gather(take(reference(x)), "none")


@dataclass
class _Batch:
    """One batch as the fine-tune sees it: the images, their keys, the attacked rows and how they
    are gathered over ranks, the anchors and the frozen original's features."""

    x: torch.Tensor  # [B, C, H, W] (augmented, in the run's memory format)
    indices: torch.Tensor  # [B] int64
    epoch: int
    rows: torch.Tensor | None  # [M] attacked positions, None: all
    layout: dist.RowLayout | None
    n_att: int  # attacked images over all ranks
    reference: Callable[[torch.Tensor], torch.Tensor] | None
    anchors: torch.Tensor | None = None  # [M_global, D] float32 clean anchors of the attack
    #: the anchors are the fine-tune forward's own clean features (``free_replays``), renewed by
    #: every forward, instead of a separate no-grad forward
    live_anchors: bool = False

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The attacked rows of a [B, ...] tensor."""
        return t if self.rows is None else t.index_select(0, self.rows)

    def gather(self, t: torch.Tensor, mode: str, dctx: Any) -> torch.Tensor:
        """Attacked rows over all ranks (``mode``: "grad", "none" or "local", see ``dist.gather``)."""
        return dist.gather(t, dctx, mode) if self.layout is None else self.layout.gather(t, dctx, mode)


def _prepare_batch(
    run: Run, x: torch.Tensor, indices: torch.Tensor, epoch: int, *, live_anchors: bool = False
) -> _Batch:
    """Memory format, augmentation, the attacked rows (all, or each image's coin under
    ``adv_fraction < 1``; fewer than 2 in the global batch leave nothing to contrast: a clean-only
    step) and the clean anchors, once per batch (the model's own, eval mode, no gradient, or the
    original's); with ``live_anchors`` the model's own come from each fine-tune forward instead."""
    cfg, ctx = run.config, run.ctx
    dctx = ctx.dist
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.augmentation != "none":
        u = per_sample_uniform(indices, (3,), seed=cfg.seed, epoch=epoch, stream=1)
        x = augment(x, cfg.augmentation, cfg.crop_padding, u)
    rows = adversarial_rows(cfg, indices, epoch)
    layout = None
    if rows is not None:
        layout = dist.row_layout(rows.numel(), dctx, x.device)
        if layout.total < 2:
            rows = rows[:0]
            layout = dist.RowLayout(tuple(0 for _ in layout.counts), layout.rank)
    n_att = x.shape[0] * ctx.world if layout is None else layout.total
    bt = _Batch(x, indices, epoch, rows, layout, n_att, _reference_features(run, x, indices))
    bt.live_anchors = live_anchors and cfg.attack_anchors == "current"
    if n_att > 0 and not bt.live_anchors:
        if cfg.attack_anchors == "original":
            assert bt.reference is not None
            bt.anchors = bt.gather(bt.take(bt.reference(x)), "none", dctx)
        else:
            with torch.no_grad(), eval_mode(run.features), ctx.autocast():
                bt.anchors = bt.gather(run.features(bt.take(x)).float(), "none", dctx)
    return bt


def _attack_inputs(run: Run, bt: _Batch) -> AttackInputs:
    dctx = run.ctx.dist
    assert bt.anchors is not None
    return AttackInputs(
        encoder=run.features,
        x=bt.take(bt.x),
        clean_features=bt.anchors,
        indices=bt.take(bt.indices),
        epoch=bt.epoch,
        gather=(lambda z: bt.gather(z, "local", dctx)) if dctx.enabled else None,
        config=run.config,
        rank=dctx.rank if dctx.enabled else 0,
        reduce=(lambda t: dist.all_reduce_sum(t, dctx)) if dctx.enabled else None,
        offset=bt.layout.offset if (bt.layout is not None and dctx.enabled) else None,
        head=run.head.logits if run.head is not None else None,
    )


def _finetune_terms(run: Run, bt: _Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward of ``[x_adv; x; extra clean views]`` in fine-tune mode (autocast by the caller).

    Returns ``(loss, pull, clean, attack_loss, z_adv)``: the fine-tune loss ``pull + clean_weight *
    clean`` and its parts (0-dim float32; ``attack_loss`` = NTXent(f(x_adv), anchors), no gradient),
    and ``z_adv`` [M, D] the adversarial rows' features (with gradient).
    """
    cfg, dctx = run.config, run.ctx.dist
    x, b = bt.x, bt.x.shape[0]
    _set_finetune_mode(run)
    term = run.clean_term
    m = x_adv.shape[0]
    views = term.views(x, bt.indices, bt.epoch)
    parts = [x_adv.to(x.dtype), x] + ([views] if views is not None else [])
    z = run.train_forward(torch.cat(parts)).float()
    z_adv, z_clean, z_views = z[:m], z[m : m + b], (z[m + b :] if views is not None else None)
    if bt.live_anchors and bt.n_att > 0:
        bt.anchors = bt.gather(bt.take(z_clean.detach()), "none", dctx)

    def gather(t: torch.Tensor, mode: str) -> torch.Tensor:
        return bt.gather(t, mode, dctx)

    if bt.n_att > 0:
        pull = nt_xent(
            gather(z_adv, "grad"),
            _pull_target(cfg.pull_target, z_clean, bt.reference, x, bt.take, gather),
            cfg.temperature,
            backend=cfg.backend,
        )
        with torch.no_grad():
            assert bt.anchors is not None
            attack_loss = nt_xent(
                gather(z_adv.detach(), "none"), bt.anchors, cfg.temperature, backend=cfg.backend
            )
    else:
        pull = z_adv.sum() * 0.0  # keeps the graph (DDP) with no adversarial term
        attack_loss = torch.zeros((), device=z.device)
    clean = term(
        CleanTermInputs(
            x=x,
            z_clean=z_clean,
            z_adv=z_adv,
            z_views=z_views,
            indices=bt.indices,
            epoch=bt.epoch,
            features=run.train_forward,
            reference_features=bt.reference,
            config=cfg,
            gather=lambda t: dist.gather_with_grad(t, dctx),
            gather_no_grad=lambda t: dist.gather_no_grad(t, dctx),
            adv_rows=bt.rows,
            gather_adv=lambda t: gather(t, "grad"),
            gather_adv_no_grad=lambda t: gather(t, "none"),
        )
    )
    if clean is None:
        clean = torch.zeros((), device=z.device)
        loss = pull
    else:
        clean = clean.float()
        loss = pull + run.clean_weight * clean
    if run.head_weight > 0 and run.head is not None and bt.n_att > 0:
        loss = loss + run.head_weight * _head_term(run, bt, z_adv, z_clean)
    return loss, pull, clean, attack_loss, z_adv


def _head_term(run: Run, bt: _Batch, z_adv: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
    """``KL(h(f0(x)) || h(f(x_adv)))`` over the attacked rows (mean per image): the head ``h``'s
    predictions on the adversarial features pulled to its predictions on the original encoder's
    clean features of the same images; with ``head_clean`` also ``KL(h(f0(x)) || h(f(x)))`` over
    the clean rows, averaged with it (0-dim float32, differentiable in ``z_adv`` [M, D] and
    ``z_clean`` [B, D])."""
    assert bt.reference is not None and run.head is not None
    with torch.no_grad():
        target = run.head.logits(bt.reference(bt.x)).log_softmax(1)
    log_q = run.head.logits(z_adv).log_softmax(1)
    kl = torch.nn.functional.kl_div(log_q, bt.take(target), log_target=True, reduction="batchmean")
    if run.config.head_clean:
        log_c = run.head.logits(z_clean).log_softmax(1)
        kl = 0.5 * (kl + torch.nn.functional.kl_div(log_c, target, log_target=True, reduction="batchmean"))
    return kl


def _update(run: Run, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward, spike guard, then step / skip / stop by the nonfinite policy.

    Returns on-device ``(finite, clipped, skipped)``. Raises NonFiniteLoss on the CPU under
    ``nonfinite="stop"``, before the update.
    """
    cfg, ctx = run.config, run.ctx
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    finite = torch.isfinite(loss)
    grads = [p.grad for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None]
    clipped = run.guard(grads)
    skipped = torch.zeros((), device=loss.device)
    if cfg.nonfinite == "skip":
        if bool(finite):  # one host sync per batch: the price of skipping
            run.optimizer.step()
        else:
            run.optimizer.zero_grad(set_to_none=True)
            skipped = torch.ones((), device=loss.device)
    else:
        if ctx.device.type == "cpu" and not bool(finite):  # free on CPU: stop before the update
            raise NonFiniteLoss(f"{float(loss.detach())}")
        run.optimizer.step()
    return finite, clipped, skipped


def cbd_step(
    run: Run, x: torch.Tensor, indices: torch.Tensor, epoch: int, progress: float | None = None
) -> dict[str, torch.Tensor]:
    """One full CBD step on a batch already on the run's device.

    Args:
        run: the prepared run.
        x: [B, C, H, W] float images in [0, 1] (this rank's slice; B >= 2 over all ranks).
        indices: [B] int64 sample indices on the device: the keys of the per-sample randomness.
        epoch: 0-based epoch.
        progress: the share of the epoch done before this batch, in [0, 1), or None (unknown). Used
            only by ``free_replays`` runs with the cosine schedule, which anneal the lr per batch.

    Returns:
        on-device 0-dim tensors: ``loss``, ``loss_pull``, ``loss_clean``, ``attack_loss`` (float32;
        with ``free_replays`` the means over the replays with a finite loss), ``finite`` (bool),
        ``skipped`` and ``clipped`` (float32 0/1; with ``free_replays``: every replay skipped / any
        replay clipped).

    Raises:
        NonFiniteLoss: on the CPU under ``nonfinite="stop"``, before the update.
    """
    free = run.config.free_replays is not None
    bt = _prepare_batch(run, x, indices, epoch, live_anchors=free)
    if free:
        return _free_step(run, bt, progress)
    ctx = run.ctx
    x_att = bt.take(bt.x)
    if bt.n_att > 0:
        with ctx.autocast():  # the adversary (eval mode and input-only gradients inside)
            x_adv = run.adversary(_attack_inputs(run, bt))
    else:
        x_adv = x_att
    with ctx.autocast():
        loss, pull, clean, attack_loss, _ = _finetune_terms(run, bt, x_adv)
    finite, clipped, skipped = _update(run, loss)
    return {
        "loss": loss.detach(),
        "loss_pull": pull.detach(),
        "loss_clean": clean.detach(),
        "attack_loss": attack_loss.detach(),
        "finite": finite,
        "skipped": skipped,
        "clipped": clipped,
    }


def _anneal_lr(run: Run, epoch: int, progress: float | None) -> None:
    """Cosine lr per batch (``free_replays`` runs): factor ``0.5 * (1 + cos(pi * t / epochs))`` at
    ``t = epoch + progress``; the per-epoch schedule's value when ``progress`` is None."""
    cfg = run.config
    if cfg.lr_schedule != "cosine" or progress is None:
        return
    factor = 0.5 * (1.0 + math.cos(math.pi * (epoch + progress) / cfg.epochs))
    for g in run.optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


def _free_step(run: Run, bt: _Batch, progress: float | None) -> dict[str, torch.Tensor]:
    """``free_replays`` = m: "free" adversarial training (Shafahi et al., NeurIPS 2019) with the
    contrastive loss. The batch is replayed m times; each replay is ONE forward + backward of
    ``[x_adv; x]`` in fine-tune mode. Its backward gives the weights' gradient (one optimiser step)
    and the gradient of the same loss w.r.t. the adversary's leaves (per-sample images, universal
    parameters): one ascent step of the trigger search, which thus maximises the loss the weights
    minimise. The attack state carries over from replay to replay; the first replay sees the
    search's starting point (random PGD starts, clean sparse rows, the persistent universal sets).
    The anchors (``attack_anchors="current"``) are each forward's own clean features, detached:
    the search's statistics and the reported attack loss need no forward of their own (they equal
    the eval-mode anchors under ``bn_policy`` "eval"/"frozen" without dropout); only the very first
    batch, whose mask scan reads them before any forward, pays one no-grad forward for them.
    """
    cfg, ctx = run.config, run.ctx
    _anneal_lr(run, bt.epoch, progress)
    adv = run.adversary
    assert isinstance(adv, TriggerSearch)  # validate() allows free_replays with it only
    st = None
    if bt.n_att > 0:
        if bt.anchors is None:  # live anchors: a forward only for the search's first-batch scan
            if adv.needs_anchors_to_begin:
                with torch.no_grad(), eval_mode(run.features), ctx.autocast():
                    bt.anchors = bt.gather(run.features(bt.take(bt.x)).float(), "none", ctx.dist)
            else:  # [M_global, 0]: the global number of attacked rows; features come with each forward
                bt.anchors = bt.x.new_zeros((bt.n_att, 0), dtype=torch.float32)
        with ctx.autocast():
            st = adv.begin(_attack_inputs(run, bt))
    dev = bt.x.device
    sums = torch.zeros(4, device=dev)
    n_finite = torch.zeros((), device=dev)
    finite_all = torch.ones((), dtype=torch.bool, device=dev)
    clipped_any = torch.zeros((), device=dev)
    for _ in range(int(cfg.free_replays)):
        with ctx.autocast():
            if st is not None:
                x_adv, leaves = adv.compose(st, leaves=True)
            else:
                x_adv, leaves = bt.take(bt.x), []
            loss, pull, clean, attack_loss, z_adv = _finetune_terms(run, bt, x_adv)
        finite, clipped, skipped = _update(run, loss)
        if st is not None and not bool(skipped):
            if bt.live_anchors:
                st.inp.clean_features = bt.anchors  # this forward's clean features
            adv.ascend(st, leaves, [t.grad for t in leaves], z_adv.detach())
        terms = torch.stack([loss.detach(), pull.detach(), clean.detach(), attack_loss.detach()])
        sums += torch.where(finite, terms, torch.zeros_like(terms))
        n_finite += finite.float()
        finite_all &= finite
        clipped_any = torch.maximum(clipped_any, clipped.float())
    if st is not None:
        adv.end(st)
    means = sums / n_finite.clamp_min(1.0)
    skipped_all = (n_finite == 0).float() if cfg.nonfinite == "skip" else torch.zeros((), device=dev)
    return {
        "loss": means[0],
        "loss_pull": means[1],
        "loss_clean": means[2],
        "attack_loss": means[3],
        "finite": finite_all,
        "skipped": skipped_all,
        "clipped": clipped_any,
    }
