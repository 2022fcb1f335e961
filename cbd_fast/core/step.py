"""One CBD step on one batch: clean anchors, the adversary, then one fine-tune update.

Per batch of unlabeled images ``x`` [B, C, H, W]:

1. clean anchors ``c = f(x)`` once, without gradient, in eval mode, gathered over ranks;
2. the adversary finds ``x_adv`` (input-only gradients, eval mode) that pushes ``f(x_adv)`` away
   from ``c``;
3. one forward of ``[x_adv; x; extra clean views]`` in fine-tune mode and one optimiser step on
   ``NTXent(f(x_adv), f(x)) + clean_weight * clean_term`` (pulling plus keeping clean behaviour),
   the gradient passed through the spike guard first.

Scalars stay on the device (no host sync), except ``nonfinite="skip"`` which must decide per batch,
and on the CPU, where a host read is free and a non-finite loss stops before the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cbd_fast.core import distributed as dist
from cbd_fast.core.adversaries import AttackInputs
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


def cbd_step(run: Run, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
    """One full CBD step on a batch already on the run's device.

    Args:
        run: the prepared run.
        x: [B, C, H, W] float images in [0, 1] (this rank's slice; B >= 2 over all ranks).
        indices: [B] int64 sample indices on the device: the keys of the per-sample randomness.
        epoch: 0-based epoch.

    Returns:
        on-device 0-dim tensors: ``loss``, ``loss_pull``, ``loss_clean``, ``attack_loss`` (float32),
        ``finite`` (bool), ``skipped`` and ``clipped`` (float32 0/1).

    Raises:
        NonFiniteLoss: on the CPU under ``nonfinite="stop"``, before the update.
    """
    cfg, ctx = run.config, run.ctx
    dctx = ctx.dist
    b = x.shape[0]
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.augmentation != "none":
        u = per_sample_uniform(indices, (3,), seed=cfg.seed, epoch=epoch, stream=1)
        x = augment(x, cfg.augmentation, cfg.crop_padding, u)
    reference = _reference_features(run, x, indices)
    # 0. The attacked rows (all, or each image's coin under adv_fraction < 1) and their layout over
    #    ranks; fewer than 2 in the global batch leave nothing to contrast: a clean-only step.
    rows = adversarial_rows(cfg, indices, epoch)
    layout = None
    if rows is not None:
        layout = dist.row_layout(rows.numel(), dctx, x.device)
        if layout.total < 2:
            rows = rows[:0]
            layout = dist.RowLayout(tuple(0 for _ in layout.counts), layout.rank)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t.index_select(0, rows)

    def gather(t: torch.Tensor, mode: str) -> torch.Tensor:
        return dist.gather(t, dctx, mode) if layout is None else layout.gather(t, dctx, mode)

    x_att, i_att = take(x), take(indices)
    n_att = b * ctx.world if layout is None else layout.total
    # 1. Clean anchors, once per batch: the model's own (eval mode, no gradient) or the original's.
    if n_att > 0:
        if cfg.attack_anchors == "original":
            assert reference is not None
            anchors = gather(take(reference(x)), "none")
        else:
            with torch.no_grad(), eval_mode(run.features), ctx.autocast():
                anchors = gather(run.features(x_att).float(), "none")
        # 2. The adversary (eval mode and input-only gradients inside).
        with ctx.autocast():
            x_adv = run.adversary(
                AttackInputs(
                    encoder=run.features,
                    x=x_att,
                    clean_features=anchors,
                    indices=i_att,
                    epoch=epoch,
                    gather=(lambda z: gather(z, "local")) if dctx.enabled else None,
                    config=cfg,
                    rank=dctx.rank if dctx.enabled else 0,
                    reduce=(lambda t: dist.all_reduce_sum(t, dctx)) if dctx.enabled else None,
                    offset=layout.offset if (layout is not None and dctx.enabled) else None,
                )
            )
    else:
        anchors, x_adv = None, x_att
    # 3. Fine-tune: one forward of [x_adv; x; extra clean views], pulling + clean term.
    _set_finetune_mode(run)
    term = run.clean_term
    m = x_adv.shape[0]
    with ctx.autocast():
        views = term.views(x, indices, epoch)
        parts = [x_adv.to(x.dtype), x] + ([views] if views is not None else [])
        z = run.train_forward(torch.cat(parts)).float()
        z_adv, z_clean, z_views = z[:m], z[m : m + b], (z[m + b :] if views is not None else None)
        if n_att > 0:
            pull = nt_xent(
                gather(z_adv, "grad"),
                _pull_target(cfg.pull_target, z_clean, reference, x, take, gather),
                cfg.temperature,
                backend=cfg.backend,
            )
            with torch.no_grad():
                assert anchors is not None
                z_att = gather(z_adv.detach(), "none")
                attack_loss = nt_xent(z_att, anchors, cfg.temperature, backend=cfg.backend)
        else:
            pull = z_adv.sum() * 0.0  # keeps the graph (DDP) with no adversarial term
            attack_loss = torch.zeros((), device=z.device)
        clean = term(
            CleanTermInputs(
                x=x,
                z_clean=z_clean,
                z_adv=z_adv,
                z_views=z_views,
                indices=indices,
                epoch=epoch,
                features=run.train_forward,
                reference_features=reference,
                gather=lambda t: dist.gather_with_grad(t, dctx),
                gather_no_grad=lambda t: dist.gather_no_grad(t, dctx),
                config=cfg,
                adv_rows=rows,
                gather_adv=lambda t: gather(t, "grad"),
                gather_adv_no_grad=lambda t: gather(t, "none"),
            )
        )
    if clean is None:
        clean = torch.zeros((), device=z.device)
        loss = pull
    else:
        clean = clean.float()
        loss = pull + cfg.clean_weight * clean
    # 4. The update: backward, spike guard, then step / skip / stop by the nonfinite policy.
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    finite = torch.isfinite(loss)
    grads = [p.grad for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None]
    clipped = run.guard(grads)
    skipped = torch.zeros((), device=z.device)
    if cfg.nonfinite == "skip":
        if bool(finite):  # one host sync per batch: the price of skipping
            run.optimizer.step()
        else:
            run.optimizer.zero_grad(set_to_none=True)
            skipped = torch.ones((), device=z.device)
    else:
        if ctx.device.type == "cpu" and not bool(finite):  # free on CPU: stop before the update
            raise NonFiniteLoss(f"{float(loss.detach())}")
        run.optimizer.step()
    return {
        "loss": loss.detach(),
        "loss_pull": pull.detach(),
        "loss_clean": clean.detach(),
        "attack_loss": attack_loss.detach(),
        "finite": finite,
        "skipped": skipped,
        "clipped": clipped,
    }
