"""cbd_fast.evaluation.metrics on hand-made cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbd_fast.evaluation.backdoors import BadNets
from cbd_fast.evaluation.metrics import (
    accuracy,
    attack_success_rate,
    defense_effectiveness_rate,
    linear_probe,
)


class PatchDetector(nn.Module):
    """Predicts class 0 when the bottom-right pixel is white, else the class coded in pixel (0, 0)."""

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 10).long().clamp(0, 9)
        logits = nn.functional.one_hot(cls, 10).float()
        trig = x[:, 0, -1, -1] == 1.0
        logits[trig] = nn.functional.one_hot(torch.zeros_like(cls[trig]), 10).float()
        return logits


def _data():
    labels = torch.arange(20) % 10
    x = torch.zeros(20, 1, 28, 28)
    x[:, 0, 0, 0] = labels.float() / 10 + 0.01
    return x, labels


def test_accuracy_hand_made():
    x, y = _data()
    assert accuracy(PatchDetector(), x, y) == 1.0
    y2 = y.clone()
    y2[:5] = (y2[:5] + 1) % 10
    assert accuracy(PatchDetector(), x, y2) == pytest.approx(0.75)


def test_asr_counts_only_non_target_images():
    x, y = _data()
    # Every triggered image goes to 0; the 2 class-0 images are excluded -> ASR = 18/18.
    assert attack_success_rate(PatchDetector(), x, y, BadNets(), target=0) == 1.0
    # Target 5: nothing triggered goes to 5 (they all go to 0).
    assert attack_success_rate(PatchDetector(), x, y, BadNets(), target=5) == 0.0
    # A trigger that does nothing: ASR = share of non-target images already predicted as target = 0.
    assert attack_success_rate(PatchDetector(), x, y, lambda t: t, target=0) == 0.0


def test_der_formula():
    assert defense_effectiveness_rate(0.9, 1.0, 0.9, 0.0) == pytest.approx(1.0)
    assert defense_effectiveness_rate(0.9, 1.0, 0.9, 1.0) == pytest.approx(0.5)
    assert defense_effectiveness_rate(0.9, 1.0, 0.8, 0.1) == pytest.approx((0.9 - 0.1 + 1) / 2)
    # an ACC gain or an ASR rise are clipped at 0
    assert defense_effectiveness_rate(0.8, 0.1, 0.9, 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="acc_after"):
        defense_effectiveness_rate(0.9, 1.0, 90.0, 0.0)


def test_accuracy_length_mismatch():
    x, y = _data()
    with pytest.raises(ValueError, match="same length"):
        accuracy(PatchDetector(), x, y[:3])


def test_linear_probe_separable():
    torch.manual_seed(0)
    y = torch.arange(200) % 4
    centers = torch.randn(4, 8) * 4
    feats = centers[y] + torch.randn(200, 8) * 0.1
    images = feats.view(200, 1, 2, 4)  # an "image" whose flattened pixels are the features
    enc = nn.Flatten()
    probe = linear_probe(enc, images, y, num_classes=4, steps=100)
    assert accuracy(probe, images, y) == 1.0
