"""The evocation diagnostic and its contrastive adversaries (cbd_fast.evaluation.diagnostics)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbd_fast.core.attack import contrastive_pgd
from cbd_fast.evaluation import diagnostics


def _encoder() -> nn.Module:
    """A training-mode conv encoder [N, 1, 6, 6] -> [N, 4, 4, 4] with a BatchNorm kept in eval mode
    and one frozen parameter: the flags the diagnostic must give back."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    net[1].eval()
    net[0].bias.requires_grad_(False)
    return net


def _flags(net: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in net.modules()], [p.requires_grad for p in net.parameters()]


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(n))


def test_adversaries_stay_in_ball_and_box_and_restore_flags() -> None:
    net, x = _encoder(), _images(9)
    flags = _flags(net)
    adv = diagnostics.contrastive_adversaries(net, x, epsilon=8 / 255, steps=2, batch_size=4)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert _flags(net) == flags


def test_adversaries_are_the_library_pgd_and_seeded() -> None:
    net, x = _encoder(), _images(5)
    adv = diagnostics.contrastive_adversaries(net, x, epsilon=8 / 255, steps=3, seed=7)
    net.eval()
    with torch.no_grad():
        anchor = net(x).flatten(1)
    ref = contrastive_pgd(
        net,
        x,
        anchor,
        epsilon=8 / 255,
        step_size=2 / 255,
        steps=3,
        temperature=0.5,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(adv, ref, rtol=0, atol=0)
    again = diagnostics.contrastive_adversaries(net, x, epsilon=8 / 255, steps=3, seed=7)
    torch.testing.assert_close(adv, again, rtol=0, atol=0)


@pytest.mark.parametrize(("n", "batch_size"), [(5, 4), (9, 4), (2, 2)])
def test_a_last_single_image_joins_the_batch_before(n: int, batch_size: int) -> None:
    adv = diagnostics.contrastive_adversaries(_encoder(), _images(n), steps=1, batch_size=batch_size)
    assert adv.shape[0] == n


def test_adversaries_reject_a_bad_setting() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 2.*got 4, 1"):
        diagnostics.contrastive_adversaries(_encoder(), _images(4), batch_size=1)
    with pytest.raises(ValueError, match="epsilon"):
        diagnostics.contrastive_adversaries(_encoder(), _images(4), epsilon=-1.0)


def test_evocation_diagnostic_rows_and_flags() -> None:
    net, x = _encoder(), _images(12)
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    classifier = nn.Sequential(net, head)
    flags = _flags(net)
    res = diagnostics.evocation_diagnostic(
        net,
        x,
        classifier=classifier,
        trigger=lambda im: im.clamp(0.5, 1.0),
        target=1,
        epsilons=(4 / 255, 8 / 255),
        steps=1,
        return_features=True,
    )
    assert _flags(net) == flags
    assert res["n"] == 12 and [row["epsilon_255"] for row in res["per_epsilon"]] == [4.0, 8.0]
    for row in res["per_epsilon"]:
        assert {"top_class", "top_share", "target_share", "chance", "cos_adv_to_trigger_centroid"} <= set(row)
        assert 0.0 <= row["top_share"] <= 1.0 and 0.0 <= row["target_share"] <= 1.0
    assert -1.0 <= res["cos_clean_to_trigger_centroid"] <= 1.0
    feats = res["_features"]
    assert feats["clean"].shape == feats["adversarial"].shape == feats["triggered"].shape == (12, 64)


def test_evocation_diagnostic_without_labels_or_trigger() -> None:
    res = diagnostics.evocation_diagnostic(_encoder(), _images(4), epsilons=(8 / 255,), steps=1)
    (row,) = res["per_epsilon"]
    assert set(row) == {"epsilon", "epsilon_255", "dist_adv_to_clean"}
    with pytest.raises(ValueError, match="at least 2 images; got 1"):
        diagnostics.evocation_diagnostic(_encoder(), _images(1))
