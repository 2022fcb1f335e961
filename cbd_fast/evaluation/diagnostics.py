"""The evocation diagnostic: do contrastive adversarial examples reach a model's backdoor?

CBD (Contrastive Backdoor Defense) rests on one observation: inputs perturbed to push their features
away from their own clean features, under an unsupervised contrastive loss, land near the backdoor's
feature cluster. ``evocation_diagnostic`` measures how true that is for a given model and attack
budget, so a user can see whether the defense has something to pull on:

- ``target_share``: the share of contrastive adversaries the classifier assigns to the target
  class, against ``chance`` (the share of clean images it assigns there);
- ``top_class`` / ``top_share``: label-free version (no trigger known): the class the adversaries
  collapse into most and its share;
- with a trigger (evaluation): the cosine and Euclidean distance of adversarial and clean
  features to the centroid of triggered features.

Returns a JSON-able dict (floats and lists only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.core.attack import contrastive_pgd
from cbd_fast.core.features import batched_features, encoder_features
from cbd_fast.core.modes import eval_mode
from cbd_fast.evaluation.metrics import predict

__all__ = ["contrastive_adversaries", "evocation_diagnostic"]


def _attack_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices of ``range(n)`` of ``batch_size`` items; a last single item joins the batch before it.

    NT-Xent needs at least two rows per batch, so a remainder of one never forms its own batch.
    """
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        if n - stop == 1:
            stop = n
        yield slice(start, stop)
        start = stop


def contrastive_adversaries(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    epsilon: float = 16 / 255,
    steps: int = 10,
    step_size: float | None = None,
    temperature: float = 0.5,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample contrastive PGD adversaries of ``images`` against ``encoder`` (BN/dropout in eval).

    Each batch runs :func:`cbd_fast.core.attack.contrastive_pgd` (the attack the purification uses)
    from a uniform random start, with the batch's own clean features as the NT-Xent anchors.

    Args:
        encoder: images -> [N, D] features (or [N, ...], flattened); not modified, its submodules'
            training flags and its parameters' ``requires_grad`` are restored.
        images: [N, C, H, W] float images in [0, 1], N >= 2.
        epsilon: L-inf radius. steps: PGD iterations. step_size: default ``epsilon / 4``.
        temperature: NT-Xent temperature.
        seed: seed of the uniform random start (a generator on ``images``' device).
        batch_size: images per attack batch (NT-Xent negatives come from the same batch), >= 2.

    Returns:
        [N, C, H, W] detached adversarial images, ``images``' dtype and device.

    Raises:
        ValueError: fewer than 2 images, ``batch_size`` < 2, or a bad attack setting (named with
            its value by ``contrastive_pgd``).
    """
    if len(images) < 2 or batch_size < 2:
        raise ValueError(
            f"images and batch_size must be >= 2 (NT-Xent negatives); got {len(images)}, {batch_size}"
        )
    alpha = epsilon / 4 if step_size is None else step_size
    g = torch.Generator(device=images.device).manual_seed(seed)
    out = []
    with eval_mode(encoder):
        for part in _attack_batches(len(images), batch_size):
            x = images[part]
            with torch.no_grad():
                anchor = encoder_features(encoder, x)
            out.append(
                contrastive_pgd(
                    encoder,
                    x,
                    anchor,
                    epsilon=epsilon,
                    step_size=alpha,
                    steps=steps,
                    temperature=temperature,
                    generator=g,
                )
            )
    return torch.cat(out)


def evocation_diagnostic(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target: int | None = None,
    epsilons: tuple[float, ...] = (8 / 255, 16 / 255, 32 / 255),
    steps: int = 10,
    temperature: float = 0.5,
    seed: int = 0,
    return_features: bool = False,
) -> dict[str, Any]:
    """How strongly contrastive adversarial examples reach the backdoor, per attack radius.

    Args:
        encoder: the backbone, images -> [N, D] features (not modified).
        images: [N, C, H, W] clean images in [0, 1] (a few hundred suffice).
        classifier: images -> logits (e.g. backbone + original head, or a linear probe); enables the
            class shares.
        trigger: the poisoning transform, when known (evaluation); enables the centroid distances.
        target: the target class; enables ``target_share`` (needs ``classifier``).
        epsilons: attack radii to probe. steps, temperature: the contrastive PGD.
        seed: seed of the random starts.
        return_features: also return (under the key ``"_features"``, not JSON-able) the clean,
            triggered and adversarial (largest radius) feature arrays for plotting.

    Returns:
        ``{"n": N, "per_epsilon": [{"epsilon": e, "epsilon_255": e*255, "top_class": c,
        "top_share": s, "chance": share of clean images in that class, "target_share": ...,
        "cos_adv_to_trigger_centroid": ..., "cos_clean_to_trigger_centroid": ...,
        "dist_adv_to_trigger_centroid": ..., "dist_adv_to_clean": ...}, ...]}`` (keys that need a
        classifier / trigger / target are present only when those are given).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError(f"images must be a [N, C, H, W] tensor; got {getattr(images, 'shape', type(images))}")
    if len(images) < 2:
        raise ValueError(f"images must hold at least 2 images; got {len(images)}")
    res: dict[str, Any] = {"n": len(images), "steps": steps, "temperature": temperature, "per_epsilon": []}
    with eval_mode(encoder):
        clean_f = batched_features(encoder, images)
        clean_pred = predict(classifier, images) if classifier is not None else None
        trig_f = batched_features(encoder, trigger(images)) if trigger is not None else None
        centroid = None
        if trig_f is not None:
            centroid = trig_f.mean(0, keepdim=True)
            res.update(_trigger_reference(clean_f, trig_f, centroid))
        adv_f = None
        for eps in epsilons:
            adv = contrastive_adversaries(
                encoder, images, epsilon=eps, steps=steps, temperature=temperature, seed=seed
            )
            adv_f = batched_features(encoder, adv)
            row: dict[str, Any] = {"epsilon": eps, "epsilon_255": round(eps * 255, 3)}
            row["dist_adv_to_clean"] = (adv_f - clean_f).norm(dim=1).mean().item()
            if clean_pred is not None:
                row.update(_class_shares(predict(classifier, adv), clean_pred, target))
            if centroid is not None:
                row["cos_adv_to_trigger_centroid"] = F.cosine_similarity(adv_f, centroid).mean().item()
                row["dist_adv_to_trigger_centroid"] = (adv_f - centroid).norm(dim=1).mean().item()
            res["per_epsilon"].append(row)
    if return_features:
        res["_features"] = {
            "clean": clean_f.cpu().numpy(),
            "adversarial": adv_f.cpu().numpy() if adv_f is not None else None,
        }
        if trig_f is not None:
            res["_features"]["triggered"] = trig_f.cpu().numpy()
    return res


def _trigger_reference(
    clean_f: torch.Tensor, trig_f: torch.Tensor, centroid: torch.Tensor
) -> dict[str, float]:
    """Where clean and triggered features [N, D] sit relative to the triggered centroid [1, D]."""
    return {
        "cos_triggered_to_trigger_centroid": F.cosine_similarity(trig_f, centroid).mean().item(),
        "cos_clean_to_trigger_centroid": F.cosine_similarity(clean_f, centroid).mean().item(),
        "dist_clean_to_trigger_centroid": (clean_f - centroid).norm(dim=1).mean().item(),
        "clean_feature_norm": clean_f.norm(dim=1).mean().item(),
    }


def _class_shares(pred: torch.Tensor, clean_pred: torch.Tensor, target: int | None) -> dict[str, Any]:
    """Class shares of adversarial predictions ``pred`` [N] int64 against clean ones [N] int64.

    Returns ``top_class`` (the class adversaries fall into most), ``top_share`` (its share among
    them), ``top_class_clean_share`` (its share among clean predictions) and, with ``target``,
    ``target_share`` / ``chance`` (the target's share among adversarial / clean predictions).
    """
    counts = torch.bincount(pred, minlength=int(clean_pred.max()) + 1)
    top = int(counts.argmax())
    row: dict[str, Any] = {
        "top_class": top,
        "top_share": counts[top].item() / len(pred),
        "top_class_clean_share": (clean_pred == top).float().mean().item(),
    }
    if target is not None:
        row["target_share"] = (pred == target).float().mean().item()
        row["chance"] = (clean_pred == target).float().mean().item()
    return row
