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

import torch

from cbd_fast.core import distributed as dist
from cbd_fast.core.adversaries import AttackInputs
from cbd_fast.core.clean_terms import CleanTermInputs, augment
from cbd_fast.core.modes import eval_mode, is_batchnorm
from cbd_fast.core.prepare import Run
from cbd_fast.core.rng import per_sample_uniform
from cbd_fast.ops.nt_xent import nt_xent

__all__ = ["cbd_step", "NonFiniteLoss", "HISTORY_TERMS"]

#: the per-step losses the loop averages into the history
HISTORY_TERMS = ("loss", "loss_pull", "loss_clean", "attack_loss")


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN/Inf under ``nonfinite="stop"`` (raised before the update on the CPU)."""


def _set_finetune_mode(run: Run) -> None:
    run.model.train()
    if run.config.bn_policy in ("eval", "frozen"):
        for m in run.model.modules():
            if is_batchnorm(m):
                m.eval()


def _reference_features(run: Run, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The frozen original's features as a no-grad float32 function (None without a reference);
    its features of the batch ``x`` itself are computed once per step, however often asked for."""
    ref = run.reference
    if ref is None:
        return None
    memo: dict[str, torch.Tensor] = {}

    def call(images: torch.Tensor) -> torch.Tensor:
        if images is x and "x" in memo:
            return memo["x"]
        with torch.no_grad():
            out = ref(images).float()
        if images is x:
            memo["x"] = out
        return out

    return call


def _pull_target(
    kind: str,
    z_clean: torch.Tensor,
    reference: Callable[[torch.Tensor], torch.Tensor] | None,
    x: torch.Tensor,
    dctx: dist.DistContext,
) -> torch.Tensor:
    """[B_global, D] the features the adversarial ones are pulled to (``config.pull_target``)."""
    if kind == "clean":  # the paper's: gradient through both views
        return dist.gather_with_grad(z_clean, dctx)
    if kind == "clean_detached":
        return dist.gather_no_grad(z_clean.detach(), dctx)
    assert reference is not None  # "original": prepare_run keeps the frozen original for it
    return dist.gather_no_grad(reference(x), dctx)


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
    # 1. Clean anchors, once per batch: eval mode, no gradient, global across ranks.
    with torch.no_grad(), eval_mode(run.features), ctx.autocast():
        anchors = dist.gather_no_grad(run.features(x).float(), dctx)
    # 2. The adversary (eval mode and input-only gradients inside).
    with ctx.autocast():
        x_adv = run.adversary(
            AttackInputs(
                encoder=run.features,
                x=x,
                clean_features=anchors,
                indices=indices,
                epoch=epoch,
                gather=(lambda z: dist.gather_local_grad(z, dctx)) if dctx.enabled else None,
                config=cfg,
                rank=dctx.rank if dctx.enabled else 0,
                reduce=(lambda t: dist.all_reduce_sum(t, dctx)) if dctx.enabled else None,
            )
        )
    # 3. Fine-tune: one forward of [x_adv; x; extra clean views], pulling + clean term.
    _set_finetune_mode(run)
    term = run.clean_term
    with ctx.autocast():
        views = term.views(x, indices, epoch)
        parts = [x_adv.to(x.dtype), x] + ([views] if views is not None else [])
        z = run.train_forward(torch.cat(parts)).float()
        z_adv, z_clean, z_views = z[:b], z[b : 2 * b], (z[2 * b :] if views is not None else None)
        reference = _reference_features(run, x)
        pull = nt_xent(
            dist.gather_with_grad(z_adv, dctx),
            _pull_target(cfg.pull_target, z_clean, reference, x, dctx),
            cfg.temperature,
            backend=cfg.backend,
        )
        with torch.no_grad():
            attack_loss = nt_xent(
                dist.gather_no_grad(z_adv.detach(), dctx), anchors, cfg.temperature, backend=cfg.backend
            )
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
