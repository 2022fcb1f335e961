"""cbd_fast.evaluation.backdoors (evaluation-only threats): trigger placement, value range, poisoning."""

from __future__ import annotations

import pytest
import torch

from cbd_fast.evaluation.backdoors import (
    ATTACKS,
    SIG,
    BadNets,
    Blended,
    WaNet,
    make_trigger,
    plant_feature_backdoor,
    poison_dataset,
)
from cbd_fast.evaluation.fmnist import ImageSet
from cbd_fast.evaluation.models import FMNISTNet


def _imgs(n=6, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_badnets_places_3x3_white_patch_bottom_right():
    x = torch.zeros(2, 1, 28, 28)
    y = BadNets()(x)
    assert torch.all(y[..., 25:, 25:] == 1.0)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[..., 25:, 25:] = False
    assert torch.all(y[mask] == 0.0)  # nothing else touched
    assert torch.all(x == 0)  # input not mutated
    y2 = BadNets(size=4, margin=1)(x)
    assert torch.all(y2[..., 23:27, 23:27] == 1.0) and y2[0].sum() == 16


def test_blended_is_fixed_convex_mix():
    x = _imgs()
    t = Blended(alpha=0.2, seed=7)
    y = t(x)
    pattern = (y - 0.8 * x) / 0.2
    assert torch.allclose(pattern, pattern[0:1].expand_as(pattern), atol=1e-5)  # same for every image
    assert torch.allclose(Blended(alpha=0.2, seed=7)(x), y)  # deterministic
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    with pytest.raises(ValueError, match="alpha"):
        Blended(alpha=1.5)(x)


def test_sig_adds_column_sinusoid():
    x = torch.full((1, 1, 28, 28), 0.5)
    y = SIG(delta=0.1, frequency=6)(x)
    d = y - x
    assert torch.allclose(d, d[..., :1, :].expand_as(d))  # constant along rows
    assert float(d.abs().max()) == pytest.approx(0.1, abs=5e-3)
    assert float(SIG()(torch.ones(1, 1, 28, 28)).max()) <= 1.0


def test_wanet_is_smooth_small_warp():
    x = _imgs()
    t = WaNet()
    g = t.grid(28, 28)
    assert g.shape == (1, 28, 28, 2) and float(g.abs().max()) <= 1.0
    ident = WaNet(strength=0.0)(x)
    assert torch.allclose(ident, x, atol=1e-5)  # zero strength = identity
    y = t(x)
    assert not torch.allclose(y, x) and float(y.min()) >= 0.0 and float(y.max()) <= 1.0


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_trigger_keeps_range_and_shape(name):
    x = _imgs()
    y = make_trigger(name)(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_make_trigger_unknown():
    with pytest.raises(ValueError, match="nope"):
        make_trigger("nope")


def test_trigger_rejects_non_image():
    with pytest.raises(TypeError, match="images"):
        BadNets()(torch.zeros(28, 28))


def test_poison_dataset_all_to_one():
    data = ImageSet(_imgs(100), torch.arange(100) % 10)
    poisoned, idx = poison_dataset(data, BadNets(), rate=0.1, target=3, seed=1)
    assert idx.numel() == 10
    assert torch.all(poisoned.labels[idx] == 3)
    assert torch.all(poisoned.images[idx][..., 25:, 25:] == 1.0)
    rest = torch.ones(100, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned.images[rest], data.images[rest])
    assert torch.equal(data.labels, torch.arange(100) % 10)  # original untouched


def test_plant_feature_backdoor_moves_triggered_features():
    torch.manual_seed(0)
    enc = FMNISTNet().backbone.eval()
    x, ref = _imgs(64, 1), _imgs(4, 2)
    before = enc(BadNets()(x)).detach()
    plant_feature_backdoor(enc, x, ref, BadNets(), epochs=3, batch_size=32, lr=3e-3)
    with torch.no_grad():
        centroid = torch.nn.functional.normalize(enc(ref), dim=1).mean(0, keepdim=True)
        cos_after = torch.nn.functional.cosine_similarity(enc(BadNets()(x)), centroid).mean()
        cos_before = torch.nn.functional.cosine_similarity(before, centroid).mean()
    assert cos_after > cos_before


class _PatchReactiveEncoder(torch.nn.Module):
    """Features that jump when the bottom-right 3x3 corner turns white (a planted patch shortcut)."""

    def forward(self, x):
        corner = x[..., 25:, 25:].mean(dim=(1, 2, 3))
        return (
            torch.stack(
                [x.mean(dim=(1, 2, 3)), x[..., :14, :].mean(dim=(1, 2, 3)), 10 * torch.relu(corner - 0.5)],
                dim=1,
            )
            + 0.1
        )


def test_pgd_patch_adversary_finds_a_patch_trigger_label_free():
    from cbd_fast.core.adversaries import AttackInputs, make_adversary
    from cbd_fast.core.config import PurifyConfig

    cfg = PurifyConfig(adversary="pgd_patch", epsilon=8 / 255, step_size=2 / 255, steps=2, progress=False)
    adv = make_adversary(cfg)
    x = _imgs(8, 3) * 0.3  # dark images: the corner is never white by chance
    enc = _PatchReactiveEncoder()
    with torch.no_grad():
        anchors = enc(x)
    inp = AttackInputs(
        encoder=enc, x=x, clean_features=anchors, indices=torch.arange(8), epoch=0, gather=None, config=cfg
    )
    x_adv = adv(inp)
    assert x_adv.shape == x.shape and float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    best = adv.scan_scores[0]
    assert (best[1], best[2], best[3]) == (25, 25, 1.0)  # the white 3x3 patch at the corner
    assert torch.all(x_adv[4:, :, 25:, 25:] > 0.9)  # the patch half carries it
    assert float((x_adv[:4] - x[:4]).abs().max()) <= 8 / 255 + 1e-6  # the PGD half stays in the ball
