"""Evaluation metrics (labels are used here, and only here): ACC, ASR, DER and a linear probe.

- ``accuracy``: clean test accuracy of a classifier.
- ``attack_success_rate``: share of triggered test images whose true class is NOT the target that
  the classifier assigns to the target.
- ``defense_effectiveness_rate``: DER = (max(0, dASR) - max(0, dACC) + 1) / 2 with dASR = ASR before -
  ASR after and dACC = ACC before - ACC after (all as fractions in [0, 1]).
- ``linear_probe``: a linear classifier trained on frozen features (self-supervised encoders).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.core.features import batched_features, encoder_features
from cbd_fast.core.modes import eval_mode

__all__ = [
    "accuracy",
    "attack_success_rate",
    "defense_effectiveness_rate",
    "evaluate_backdoor",
    "linear_probe",
    "predict",
]


@torch.no_grad()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """Arg-max predictions [N] int64 of ``model`` on [N, ...] ``images``, in batches, in eval mode.

    A module's submodules get their own ``training`` flags back afterwards (``eval_mode``).
    """
    with eval_mode(model):
        out = [model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(
    model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Fraction in [0, 1] of [N] ``labels`` that ``model`` predicts right on [N, C, H, W] ``images``."""
    if len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length; got {len(images)} and {len(labels)}")
    if len(labels) == 0:
        raise ValueError("labels must be non-empty; got 0 images")
    return (predict(model, images) == labels).float().mean().item()


def attack_success_rate(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int = 0,
) -> float:
    """ASR in [0, 1]: share of non-target ``images`` that, with ``trigger``, are classified ``target``.

    Args:
        model: the classifier.
        images: [N, C, H, W] clean test images in [0, 1].
        labels: [N] their true classes (images of class ``target`` are left out).
        trigger: the poisoning transform.
        target: the attacker's target class.
    """
    keep = labels != target
    if not bool(keep.any()):
        raise ValueError(f"no test image outside the target class {target}")
    return (predict(model, trigger(images[keep])) == target).float().mean().item()


def defense_effectiveness_rate(
    acc_before: float, asr_before: float, acc_after: float, asr_after: float
) -> float:
    """DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2, all fractions."""
    for name, v in (
        ("acc_before", acc_before),
        ("asr_before", asr_before),
        ("acc_after", acc_after),
        ("asr_after", asr_after),
    ):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1]; got {v}")
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def evaluate_backdoor(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int = 0,
) -> dict[str, float]:
    """``{"acc": ACC, "asr": ASR}`` of ``model`` on a test set (fractions in [0, 1])."""
    return {
        "acc": accuracy(model, images, labels),
        "asr": attack_success_rate(model, images, labels, trigger, target),
    }


def linear_probe(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int = 10,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Module:
    """Train a linear classifier on frozen ``encoder`` features of clean labeled data.

    Features are standardised (mean/std of the training features, folded into the returned model),
    then a linear layer is fit full-batch with Adam. Deterministic for a given ``seed``.

    Args:
        encoder: images -> [N, D] features (or [N, ...], flattened; not modified; run in eval mode
            without gradients).
        images: [N, C, H, W] clean labeled training images.
        labels: [N] int64 classes.
        num_classes, steps, lr, weight_decay: the probe and its optimisation.
        seed: seed of the initialisation.

    Returns:
        The classifier ``images -> logits`` = probe(encoder(images)) as an ``nn.Module`` holding a
        reference to ``encoder``.
    """
    feats = batched_features(encoder, images)
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    torch.manual_seed(seed)
    lin = nn.Linear(z.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(lin(z), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():  # fold the standardisation into the layer
        w = lin.weight / sd
        b = lin.bias - w @ mu
        probe = nn.Linear(z.shape[1], num_classes)
        probe.weight.copy_(w)
        probe.bias.copy_(b)
    return _Probe(encoder, probe.requires_grad_(False))


class _Probe(nn.Module):
    """``head(encoder_features(encoder, x))``: images [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor], head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(encoder_features(self.encoder, x))
