"""The original four baselines (moved here unchanged from ``cbd_fast/evaluation/baselines.py``).

- ``no_defense``: the backbone as downloaded.
- ``plain_finetune``: ``cbd_fast.purify`` with the same config but no adversary (``adversary="none"``,
  ``epsilon=0``: the same loss with x_adv = x): isolates what the adversary adds. Label-free.
- ``supervised_finetune``: cross-entropy fine-tuning of backbone + head with the defender's images
  LABELED (uses labels: a stronger-information baseline).
- ``adversarial_unlearning``: label-based adversarial unlearning: PGD adversaries that maximise the
  cross-entropy of the true label, then cross-entropy training on clean and adversarial images
  (uses labels).

Each returns new modules (deep copies); the inputs are never modified. They take ``(backbone, head)``;
the paper baselines of this package (``fine_tuning``, ``fine_pruning``, ``nad``, ``anp``, ``i_bau``)
take the whole classifier.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.core.modes import attack_mode
from cbd_fast.ops.pgd import pgd_init, pgd_step

__all__ = ["adversarial_unlearning", "no_defense", "plain_finetune", "supervised_finetune"]


def no_defense(backbone: nn.Module) -> nn.Module:
    """The backbone unchanged (a deep copy)."""
    return copy.deepcopy(backbone)


def plain_finetune(
    backbone: nn.Module, images: torch.Tensor, config: Any = None, **overrides: Any
) -> nn.Module:
    """``purify(backbone, images, config, adversary="none", epsilon=0)``: the CBD loss with no adversary.

    x_adv = x, so every term of the loss (pulling, clean term) is computed as in CBD but nothing is
    attacked: isolates what the adversary adds.

    Args:
        backbone: images -> features (not modified).
        images: [M, C, H, W] unlabeled images in [0, 1].
        config: a ``PurifyConfig`` (default: the defaults), overrides: its fields.
    """
    from cbd_fast import purify

    overrides = {**overrides, "epsilon": 0.0, "adversary": "none"}
    return purify(backbone, images, config, **overrides)


def _check(images: torch.Tensor, labels: torch.Tensor) -> None:
    if len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length; got {len(images)} and {len(labels)}")
    if len(images) < 2:
        raise ValueError(f"images must hold at least 2 images; got {len(images)}")


def _ce_pgd(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Cross-entropy PGD: images in the L-inf ball around ``x`` that maximise ``CE(net(x_adv), y)``.

    A uniform random start (``pgd_init``), then ``steps`` signed-gradient steps of ``epsilon / 4``
    (``pgd_step``: projected on the ball and on [0, 1]), with ``net`` in ``attack_mode`` (eval mode,
    no parameter gradients; its flags restored afterwards).

    Args:
        net: images -> logits [B, K].
        x: [B, C, H, W] contiguous float images in [0, 1]. y: [B] int64 true classes.
        epsilon: L-inf radius > 0. steps: iterations >= 1.
        generator: CPU generator of the random start.

    Returns:
        [B, C, H, W] detached adversarial images.
    """
    x_adv = pgd_init(x, epsilon, generator=generator)
    with attack_mode(net), torch.enable_grad():
        for _ in range(steps):
            x_var = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(net(x_var), y), x_var)
            pgd_step(x_adv, grad.contiguous(), x, epsilon / 4, epsilon)
    return x_adv.detach()


def _train_ce(
    backbone: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    epsilon: float = 0.0,
    steps: int = 0,
) -> tuple[nn.Module, nn.Module]:
    _check(images, labels)
    bb, hd = copy.deepcopy(backbone), copy.deepcopy(head)
    net = nn.Sequential(bb, hd)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(images) / batch_size))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch_size):
            b = perm[i : i + batch_size]
            x, y = images[b].contiguous(), labels[b]
            loss_terms = []
            if epsilon > 0 and steps > 0:
                loss_terms.append(_ce_pgd(net, x, y, epsilon=epsilon, steps=steps, generator=g))
            net.train()
            loss = F.cross_entropy(net(x), y)
            for xa in loss_terms:
                loss = loss + F.cross_entropy(net(xa), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return bb.eval(), hd.eval()


def supervised_finetune(
    backbone: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 5,
    lr: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """Cross-entropy fine-tuning of ``head(backbone(x))`` on labeled images (SGD, cosine schedule).

    Args:
        backbone: images -> features. head: features -> logits (for a self-supervised encoder pass a
            fresh linear layer). Neither is modified.
        images: [M, C, H, W] images in [0, 1]. labels: [M] int64 true classes.
        epochs, lr, batch_size, seed: optimisation.

    Returns:
        ``(backbone, head)``: fine-tuned copies in eval mode.
    """
    return _train_ce(backbone, head, images, labels, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


def adversarial_unlearning(
    backbone: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float = 16 / 255,
    steps: int = 5,
    epochs: int = 5,
    lr: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """Label-based adversarial unlearning: CE on clean + CE-PGD adversarial images (true labels).

    Args:
        backbone, head, images, labels, epochs, lr, batch_size, seed: as ``supervised_finetune``.
        epsilon: L-inf radius of the cross-entropy PGD; steps: its iterations (step ``epsilon / 4``).

    Returns:
        ``(backbone, head)``: defended copies in eval mode.
    """
    if epsilon < 0 or steps < 0:
        raise ValueError(f"epsilon and steps must be >= 0; got {epsilon}, {steps}")
    return _train_ce(
        backbone,
        head,
        images,
        labels,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        epsilon=epsilon,
        steps=steps,
    )
