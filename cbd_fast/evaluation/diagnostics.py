"""The evocation diagnostic: do contrastive adversarial examples reach a model's backdoor?

CBD rests on one observation (``shared/CBD.md``): inputs perturbed to push their features away from
their own clean features, under an unsupervised contrastive loss, land near the backdoor's
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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["contrastive_adversaries", "evocation_diagnostic"]


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

    Args:
        encoder: images -> [N, D] features (not modified; its training flag is restored).
        images: [N, C, H, W] float images in [0, 1].
        epsilon: L-inf radius. steps: PGD iterations. step_size: default ``epsilon / 4``.
        temperature: NT-Xent temperature.
        seed: seed of the uniform random start.
        batch_size: images per attack batch (NT-Xent negatives come from the same batch).

    Returns:
        [N, C, H, W] detached adversarial images.
    """
    from cbd_fast.ops import nt_xent

    if epsilon < 0 or steps < 0:
        raise ValueError(f"epsilon and steps must be >= 0; got {epsilon}, {steps}")
    if len(images) < 2 or batch_size < 2:
        raise ValueError(
            f"images and batch_size must be >= 2 (NT-Xent negatives); got {len(images)}, {batch_size}"
        )
    alpha = epsilon / 4 if step_size is None else step_size
    modes = [(m, m.training) for m in encoder.modules()]  # restored per submodule
    flags = [q.requires_grad for q in encoder.parameters()]
    encoder.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    out = []
    try:
        n = len(images)
        for i in range(0, n, batch_size):
            if n - i == 1:  # a last single image was attacked with the previous batch
                break
            x = images[i : i + batch_size + (1 if n - i - batch_size == 1 else 0)]
            with torch.no_grad():
                anchor = encoder(x)
            noise = (torch.rand(x.shape, generator=g) * 2 - 1).to(x)
            xa = (x + epsilon * noise).clamp(0, 1)
            for _ in range(steps):
                xa.requires_grad_(True)
                loss = nt_xent(encoder(xa), anchor, temperature)
                (grad,) = torch.autograd.grad(loss, xa)
                # x_adv <- clip(proj_eps(x_adv + alpha * sign(g)), 0, 1)
                xa = torch.min(torch.max(xa.detach() + alpha * grad.sign(), x - epsilon), x + epsilon)
                xa = xa.clamp(0, 1)
            out.append(xa.detach())
    finally:
        for q, fl in zip(encoder.parameters(), flags):
            q.requires_grad_(fl)
        for m, mode in modes:
            m.training = mode
    return torch.cat(out)


@torch.no_grad()
def _feats(encoder: nn.Module, x: torch.Tensor, bs: int = 1000) -> torch.Tensor:
    return torch.cat([encoder(x[i : i + bs]) for i in range(0, len(x), bs)])


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
    modes = [(m, m.training) for m in encoder.modules()]  # restored per submodule at the end
    encoder.eval()
    res: dict[str, Any] = {"n": len(images), "steps": steps, "temperature": temperature, "per_epsilon": []}
    clean_f = _feats(encoder, images)
    clean_pred = None
    if classifier is not None:
        clean_pred = torch.cat(
            [classifier(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)]
        )
    centroid = None
    trig_f = None
    if trigger is not None:
        trig_f = _feats(encoder, trigger(images))
        centroid = trig_f.mean(0, keepdim=True)
        res["cos_triggered_to_trigger_centroid"] = F.cosine_similarity(trig_f, centroid).mean().item()
        res["cos_clean_to_trigger_centroid"] = F.cosine_similarity(clean_f, centroid).mean().item()
        res["dist_clean_to_trigger_centroid"] = (clean_f - centroid).norm(dim=1).mean().item()
        res["clean_feature_norm"] = clean_f.norm(dim=1).mean().item()
    adv_f = None
    for eps in epsilons:
        adv = contrastive_adversaries(
            encoder, images, epsilon=eps, steps=steps, temperature=temperature, seed=seed
        )
        adv_f = _feats(encoder, adv)
        row: dict[str, Any] = {"epsilon": eps, "epsilon_255": round(eps * 255, 3)}
        row["dist_adv_to_clean"] = (adv_f - clean_f).norm(dim=1).mean().item()
        if classifier is not None and clean_pred is not None:
            with torch.no_grad():
                pred = torch.cat([classifier(adv[i : i + 1000]).argmax(1) for i in range(0, len(adv), 1000)])
            counts = torch.bincount(pred, minlength=int(clean_pred.max()) + 1)
            top = int(counts.argmax())
            row["top_class"] = top
            row["top_share"] = counts[top].item() / len(pred)
            row["top_class_clean_share"] = (clean_pred == top).float().mean().item()
            if target is not None:
                row["target_share"] = (pred == target).float().mean().item()
                row["chance"] = (clean_pred == target).float().mean().item()
        if centroid is not None:
            row["cos_adv_to_trigger_centroid"] = F.cosine_similarity(adv_f, centroid).mean().item()
            row["dist_adv_to_trigger_centroid"] = (adv_f - centroid).norm(dim=1).mean().item()
        res["per_epsilon"].append(row)
    for m, mode in modes:
        m.training = mode
    if return_features:
        res["_features"] = {
            "clean": clean_f.numpy(),
            "adversarial": adv_f.numpy() if adv_f is not None else None,
        }
        if trig_f is not None:
            res["_features"]["triggered"] = trig_f.numpy()
    return res
