"""The held-out protocol: splits, the defender's independent draw and the purpose checks."""

from __future__ import annotations

import pytest
import torch

from cbd_fast.evaluation.fmnist import ImageSet, split_unlabeled
from cbd_fast.evaluation.protocol import (
    REPORT_SEEDS,
    TUNING_SEEDS,
    ProtocolError,
    check_purpose,
    defender_images,
    split_test_set,
)


def _set(n: int) -> ImageSet:
    return ImageSet(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 10)


def test_validation_and_test_halves_are_disjoint_and_fixed() -> None:
    data = _set(1000)
    val, test = split_test_set(data, "validation"), split_test_set(data, "test")
    a, b = set(val.images.flatten().tolist()), set(test.images.flatten().tolist())
    assert len(a) == 500 and len(b) == 500 and not a & b
    assert torch.equal(split_test_set(data, "test").images, test.images)  # one fixed permutation
    with pytest.raises(ValueError, match="'validation' or 'test'; got 'train'"):
        split_test_set(data, "train")


def test_defender_draw_is_independent_of_the_poisoned_indices() -> None:
    data = _set(60000)
    for seed in (0, 1, 2):
        poisoned = set(torch.randperm(60000, generator=torch.Generator().manual_seed(seed))[:6000].tolist())
        _, idx = defender_images(data, 0.05, seed=seed)
        share = len(poisoned & set(idx.tolist())) / len(idx)
        assert len(idx) == 3000 and 0.08 < share < 0.12  # about the poison rate, as any independent draw
        _, old = defender_images(data, 0.05, seed=seed, overlap=True)
        assert set(old.tolist()) <= poisoned  # the ablation: exactly the first poisoned images
        assert torch.equal(old, split_unlabeled(data, 0.05, seed=seed)[1])
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]; got 0"):
        defender_images(data, 0.0, seed=0)


def test_purpose_checks() -> None:
    assert not set(TUNING_SEEDS) & set(REPORT_SEEDS)
    check_purpose("tune", split_of_attack="dev", seed=TUNING_SEEDS[0], images="validation")
    check_purpose("report", split_of_attack="report", seed=REPORT_SEEDS[0], images="test")
    check_purpose("report", split_of_attack="dev", seed=REPORT_SEEDS[0], images="test")  # shown, marked dev
    with pytest.raises(ProtocolError, match="dev attacks only"):
        check_purpose("tune", split_of_attack="report", seed=TUNING_SEEDS[0], images="validation")
    with pytest.raises(ProtocolError, match="validation images only"):
        check_purpose("tune", split_of_attack="dev", seed=TUNING_SEEDS[0], images="test")
    with pytest.raises(ProtocolError, match="tuning seeds"):
        check_purpose("tune", split_of_attack="dev", seed=REPORT_SEEDS[0], images="validation")
    with pytest.raises(ProtocolError, match="test images only"):
        check_purpose("report", split_of_attack="report", seed=REPORT_SEEDS[0], images="validation")
    with pytest.raises(ProtocolError, match="report seeds"):
        check_purpose("report", split_of_attack="report", seed=TUNING_SEEDS[0], images="test")
    with pytest.raises(ValueError, match="purpose must be one of"):
        check_purpose("peek", split_of_attack="dev", seed=0, images="validation")
