"""cbd_fast.evaluation.zoo (evaluation-only attacks): registry, triggers, state files, poisoning, builds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbd_fast.evaluation import backdoors, zoo
from cbd_fast.evaluation.fmnist import ImageSet
from cbd_fast.evaluation.models import FMNISTNet
from cbd_fast.evaluation.zoo import clean_label, optimized_patch, warps
from cbd_fast.evaluation.zoo.base import save_trigger
from cbd_fast.evaluation.zoo.dynamic import InputAwareTrigger
from cbd_fast.evaluation.zoo.generated_patch import GeneratedPatch
from cbd_fast.evaluation.zoo.optimized_patch import OptimizedPatch
from cbd_fast.evaluation.zoo.quantize import floyd_steinberg
from cbd_fast.evaluation.zoo.sample_specific import SampleSpecificTrigger
from cbd_fast.evaluation.zoo.training import poison_index

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
ALL = zoo.attack_names()
STATEFUL = [n for n in ALL if zoo.get_attack(n).stateful]


def _imgs(n: int = 4, c: int = 1, h: int = 28, w: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _garments(n: int = 4) -> torch.Tensor:
    """Fashion-MNIST-like images: a bright blob on a black background."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 8:20] = 0.3 + 0.6 * _imgs(n, 1, 16, 12, seed=3)
    return x


def _tiny_set(n: int = 256, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.5
    labels = torch.arange(n) % 10
    images[:, :, 10:18, 10:18] += (labels.float() / 20).view(-1, 1, 1, 1)  # a class signal
    return ImageSet(images.clamp(0, 1), labels)


# ---------------------------------------------------------------------------- registry


def test_splits_and_membership():
    dev, report = zoo.attack_names("dev"), zoo.attack_names("report")
    assert dev == [
        "badnets",
        "blended",
        "sig",
        "wanet",
        "badencoder",
        "pixels",
        "random_location",
        "adversarial_patch",
        "reflection",
        "ban",
        "poison_ink",
    ]
    assert set(dev[:5]) == set(backdoors.SUPERVISED_ATTACKS + backdoors.SELF_SUPERVISED_ATTACKS)
    assert len(report) >= 12 and not set(report) & set(dev)
    assert {
        "badnets_checker",
        "badnets_random",
        "blended_image",
        "wanet_noise",
        "lf",
        "bpp",
        "input_aware",
        "ssba",
        "filter",
        "trojannn",
        "label_consistent",
        "badencoder_simclr",
    } <= set(report)
    assert zoo.get_attack("label_consistent").kind == "clean_label"
    assert {n for n in ALL if zoo.get_attack(n).kind == "encoder"} == {"badencoder", "badencoder_simclr"}
    assert set(STATEFUL) == {"adversarial_patch", "ban", "input_aware", "ssba", "trojannn"}
    for name in ALL:
        a = zoo.get_attack(name)
        assert a.name == name and a.split in zoo.SPLITS and a.kind in zoo.KINDS
        assert re.search(r"(19|20)\d\d", a.citation), f"{name}: no year in {a.citation!r}"
        assert a.summary


def test_select_groups_and_names():
    assert zoo.select("all") == ALL
    assert zoo.select("report") == zoo.attack_names("report")
    assert zoo.select("ssba, dev") == [*zoo.attack_names("dev"), "ssba"]
    assert zoo.select("lf,bpp,lf") == ["lf", "bpp"]


@pytest.mark.parametrize("bad", ["nope", "badnets,nope", "", " , "])
def test_select_rejects_unknown(bad):
    with pytest.raises(ValueError, match="dev"):
        zoo.select(bad)


def test_bad_names_and_values():
    train = _tiny_set(64)
    with pytest.raises(ValueError, match=r"'nope'.*|.*badnets_checker"):
        zoo.get_attack("nope")
    with pytest.raises(ValueError, match="resnet8"):
        zoo.build("badnets", "resnet99", train, seed=0)
    with pytest.raises(ValueError, match="'bogus'.*bits|bits.*'bogus'"):
        zoo.build("bpp", "mlp", train, seed=0, settings={"bogus": 1})
    with pytest.raises(ValueError, match="bits"):
        zoo.test_trigger("bpp", settings={"bits": "three"})
    with pytest.raises(ValueError, match="bits"):
        zoo.test_trigger("bpp", settings={"bits": 2.5})
    with pytest.raises(ValueError, match="rate"):
        zoo.build("bpp", "mlp", train, seed=0, rate=1.5)
    with pytest.raises(ValueError, match="epochs"):
        zoo.build("bpp", "mlp", train, seed=0, epochs=0)
    with pytest.raises(ValueError, match="target"):
        zoo.build("bpp", "mlp", train, seed=0, target=-1)
    with pytest.raises(TypeError, match="ImageSet"):
        zoo.build("bpp", "mlp", train.images, seed=0)


# ---------------------------------------------------------------------------- triggers


@pytest.mark.parametrize("name", ALL)
def test_trigger_contract(name):
    trigger = zoo.test_trigger(name)
    for x in (_imgs(), _garments()):
        before = x.clone()
        y = trigger(x)
        assert torch.equal(x, before), "the trigger modified its input"
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert not torch.allclose(y, x, atol=1e-3), "the trigger does not change the image"
        assert torch.equal(trigger(x), y), "not deterministic"
        assert torch.equal(zoo.test_trigger(name)(x), y), "a fresh trigger differs"
    x64 = _imgs().double()
    y64 = trigger(x64)
    assert y64.dtype == torch.float64 and float(y64.min()) >= 0.0 and float(y64.max()) <= 1.0


@pytest.mark.parametrize("name", zoo.attack_names("report"))
def test_report_triggers_are_not_dev_triggers(name):
    x = _garments()
    y = zoo.test_trigger(name)(x)
    for dev in zoo.attack_names("dev"):
        assert not torch.allclose(y, zoo.test_trigger(dev)(x), atol=1e-3), f"{name} equals {dev}"


@pytest.mark.parametrize("name", [n for n in ALL if zoo.get_attack(n).split == "report"])
def test_other_shapes_work_or_name_the_shape(name):
    trigger = zoo.test_trigger(name)
    for shape in ((2, 3, 32, 32), (2, 1, 40, 36), (2, 1, 4, 4)):
        x = torch.rand(shape)
        try:
            y = trigger(x)
        except ValueError as exc:
            assert str(tuple(shape)) in str(exc), f"{name}: the error does not name the shape: {exc}"
        else:
            assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    with pytest.raises(ValueError, match=r"\(28, 28\)"):
        trigger(torch.rand(28, 28))
    with pytest.raises(TypeError):
        trigger([[0.5]])


def test_patch_positions_and_patterns():
    x = torch.zeros(1, 1, 28, 28)
    checker = zoo.test_trigger("badnets_checker")(x)[0, 0]
    assert torch.equal(checker[1:5, 1:5], torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]] * 2))
    assert float(checker.sum()) == 8 and float(checker[1:5, 1:5].sum()) == 8
    rnd = zoo.test_trigger("badnets_random")(torch.full((1, 1, 28, 28), 0.5))[0, 0]
    changed = (rnd != 0.5).nonzero()
    assert changed[:, 0].min() == 4 and changed[:, 0].max() == 8 and changed[:, 1].min() == 18
    assert changed[:, 1].max() == 22 and set(rnd[4:9, 18:23].unique().tolist()) == {0.0, 1.0}
    plus = zoo.test_trigger("badencoder_simclr")(x)[0, 0]
    assert float(plus.sum()) == 9 and float(plus[1:6, 22:27].sum()) == 9 and plus[3, 24] == 1
    corners = zoo.test_trigger("label_consistent")(x)[0, 0]
    for r, c in ((slice(1, 4), slice(1, 4)), (slice(1, 4), slice(24, 27)), (slice(24, 27), slice(1, 4))):
        assert float(corners[r, c].sum()) in (4.0, 5.0)
    assert torch.equal(corners, corners.flip(1))  # mirrored: survives a horizontal flip


def test_sparse_dev_triggers():
    x = _garments()
    pix = zoo.test_trigger("pixels")
    changed = (pix(torch.zeros(3, 1, 28, 28)) > 0).reshape(3, -1)
    assert changed.sum(1).tolist() == [12, 12, 12] and bool((changed == changed[:1]).all())
    rows, cols = pix.positions(28, 28) // 28, pix.positions(28, 28) % 28
    assert int(rows.min()) >= 1 and int(rows.max()) <= 26 and int(cols.min()) >= 1 and int(cols.max()) <= 26
    # no 5x5 square holds more than a few of the pixels: a patch scan cannot cover the trigger
    grid = changed[0].reshape(1, 1, 28, 28).float()
    assert float(torch.nn.functional.avg_pool2d(grid, 5, 1).max()) * 25 <= 4
    loc = zoo.test_trigger("random_location")
    r, c = loc.locations(x)
    assert len(set(zip(r.tolist(), c.tolist()))) >= len(x) - 1, "the location must vary per image"
    assert torch.equal(loc(x), torch.cat([loc(x[:1]), loc(x[1:])])), (
        "the location must not depend on the batch"
    )
    y = loc(x)
    for i in range(len(x)):
        diff = (y[i] != x[i]).nonzero()
        assert diff.numel() == 0 or (
            int(diff[:, 1].min()) >= int(r[i]) and int(diff[:, 2].max()) < int(c[i]) + 4
        )
    with pytest.raises(ValueError, match="count"):
        type(pix)(count=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]; got \[-1.0, -1.0\]"):
        type(loc)(pattern=torch.full((2, 2), -1.0))
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\)"):
        loc(torch.rand(2, 1, 4, 4))


def test_global_and_invisible_triggers():
    x = _garments()
    lf = zoo.test_trigger("lf").pattern(28, 28)
    assert float(lf.abs().max()) == pytest.approx(0.1, abs=1e-6)
    spectrum = torch.fft.fft2(lf.double()).abs()
    k = (torch.fft.fftfreq(28, dtype=torch.float64) * 28).round().abs()
    high = (k[:, None] > 3) | (k[None, :] > 3)
    assert float(spectrum[high].max()) < 1e-6 * float(spectrum.max())  # low frequencies only
    assert float(spectrum[(k[:, None] == 3) & (k[None, :] <= 3)].max()) > 1e-3 * float(spectrum.max())
    filt = zoo.test_trigger("filter")(x) - x
    assert bool((filt[x == 0] > 0.05).all()), "the filter must change the black background too"
    q = zoo.test_trigger("bpp")(x)
    assert torch.allclose(q * 7, (q * 7).round(), atol=1e-5)  # 3 bits: multiples of 1/7
    warp = zoo.test_trigger("wanet_noise")
    noisy = warp.noisy(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy, warp(x), atol=1e-3) and noisy.shape == x.shape
    blend = zoo.test_trigger("blended_image")(x) - 0.8 * x
    assert torch.allclose(blend, blend[:1].expand_as(blend), atol=1e-6)  # the same key image for all


def test_reflection_is_a_smooth_global_blend():
    from cbd_fast.evaluation.zoo.reflection import ReflectionBlend, reflection_key

    x = _garments()
    trig = zoo.test_trigger("reflection")
    assert isinstance(trig, ReflectionBlend) and trig.alpha == 0.15
    key = (trig(x) - 0.85 * x) / 0.15
    assert torch.allclose(key, key[:1].expand_as(key), atol=1e-5)  # one key for every image
    k = reflection_key(28, 28, seed=23)
    assert torch.allclose(key[0, 0], k, atol=1e-5) and float(k.max()) == pytest.approx(1.0)
    assert float((k > 0.05).float().mean()) > 0.3, "the key must cover much of the image, not a patch"
    # out of focus: neighbouring pixels differ little, far less than the key's range
    assert float((k[1:] - k[:-1]).abs().max()) < 0.3 and float((k[:, 1:] - k[:, :-1]).abs().max()) < 0.3
    assert not torch.equal(k, reflection_key(28, 28, seed=24))
    big = reflection_key(224, 224, seed=23)  # the drawing scales with the image
    small = torch.nn.functional.interpolate(big[None, None], size=(28, 28), mode="area")[0, 0]
    assert float((small - k).abs().mean()) < 0.05
    with pytest.raises(ValueError, match="alpha"):
        ReflectionBlend(alpha=0.0)
    with pytest.raises(ValueError, match="shapes"):
        ReflectionBlend(shapes=0)
    with pytest.raises(ValueError, match="blur"):
        reflection_key(28, 28, seed=0, blur=0.9)
    with pytest.raises(ValueError, match="3x28"):
        reflection_key(3, 28, seed=0)


def test_floyd_steinberg_keeps_the_mean():
    x = torch.full((1, 1, 16, 16), 0.3)
    y = floyd_steinberg(x, 2)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert float(y.mean()) == pytest.approx(0.3, abs=0.03)  # dithering, not rounding (which gives 0)


def test_sample_specific_triggers_differ_per_image():
    x = _garments(3)
    ssba = zoo.test_trigger("ssba")
    with torch.no_grad():
        r = ssba.residual(x)
    assert float(r.abs().max()) <= 0.05 + 1e-6
    assert not torch.allclose(r[0], r[1], atol=1e-5)
    ia = zoo.test_trigger("input_aware")
    with torch.no_grad():
        assert not torch.allclose(ia.patterns(x)[0], ia.patterns(x)[1], atol=1e-5)


def test_generated_patch_pastes_a_different_pattern_per_image_at_one_of_its_places():
    trig = zoo.test_trigger("ban")
    corners = trig.corners(28, 28)
    assert corners.shape == (4, 2) and len({tuple(c) for c in corners.tolist()}) == 4
    tiles = torch.zeros(28, 28)
    for top, left in corners.tolist():  # non-overlapping and inside the 1-pixel margin
        assert 1 <= top <= 28 - 1 - 4 and 1 <= left <= 28 - 1 - 4
        tiles[top : top + 4, left : left + 4] += 1
    assert float(tiles.max()) == 1.0
    x = torch.full((32, 1, 28, 28), 0.5)
    y = trig(x)
    changed = (y != x)[:, 0]
    used = set()
    for i in range(len(x)):
        rows, cols = changed[i].nonzero(as_tuple=True)
        assert len(rows) <= 16 and len(rows) > 0
        top, left = int(rows.min()), int(cols.min())
        match = [
            k for k, c in enumerate(corners.tolist()) if c[0] <= top < c[0] + 4 and c[1] <= left < c[1] + 4
        ]
        assert match, f"image {i}: changed pixels outside every place"
        used.add(match[0])
    assert len(used) >= 3, "the place is not drawn per image"
    with torch.no_grad():
        noise, _ = trig.draw(8, torch.Generator().manual_seed(1))
        pats = trig.patterns(noise)
    assert pats.shape == (8, 1, 4, 4) and not torch.allclose(pats[0], pats[1], atol=1e-4)
    with pytest.raises(ValueError, match="size"):
        GeneratedPatch(size=0)


def test_inked_edges_follow_the_image():
    from cbd_fast.evaluation.zoo.edges import InkedEdges, edge_mask

    x = torch.zeros(2, 1, 28, 28)
    x[0, :, 6:20, 6:20] = 0.8  # a square ...
    x[1, :, 10:24, 8:22] = 0.8  # ... moved by (4, 2)
    m = edge_mask(x, 0.04)
    assert m.shape == (2, 1, 28, 28) and torch.equal(m.sum((1, 2, 3)), torch.full((2,), 31.0))
    assert float(m[..., 0, :].sum() + m[..., -1, :].sum() + m[..., 0].sum() + m[..., -1].sum()) == 0
    assert not torch.equal(m[0], m[1])
    ys, xs = m[1, 0].nonzero(as_tuple=True)
    assert 8 <= int(ys.min()) <= int(ys.max()) <= 25 and 6 <= int(xs.min()) <= int(xs.max()) <= 23
    y = zoo.test_trigger("poison_ink")(x)
    changed = (y != x).float()
    assert float((changed * (1 - m)).sum()) == 0, "a pixel off the edges changed"
    assert bool((y[m.bool().expand_as(y)] == 1.0).all()), "an edge pixel is not inked white"
    half = InkedEdges(strength=0.5)(x)
    assert torch.allclose(half[m.bool().expand_as(x)], x[m.bool().expand_as(x)] * 0.5 + 0.5)
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\)"):
        InkedEdges()(torch.rand(1, 1, 2, 2))
    for bad in ({"density": 0.0}, {"strength": 1.5}, {"value": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InkedEdges(**bad)


# ---------------------------------------------------------------------------- state files


def _changed(name: str):
    """A stateful trigger whose state differs from what its config alone (seed included) rebuilds."""
    g = torch.Generator().manual_seed(9)
    if name == "trojannn":
        return OptimizedPatch(pattern=torch.rand(1, 5, 5, generator=g), top=21, left=2, name="trojannn")
    if name == "adversarial_patch":
        return OptimizedPatch(pattern=torch.rand(1, 4, 4, generator=g), top=12, left=22, name=name)
    if name == "ban":
        trig = GeneratedPatch(seed=7)
        nets = (trig.net,)
    elif name == "input_aware":
        trig = InputAwareTrigger(seed=7)
        nets = (trig.pattern_net, trig.mask_net)
    else:
        trig = SampleSpecificTrigger(seed=7)
        nets = (trig.encoder,)
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return trig


@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_triggers_round_trip(name, tmp_path):
    trig, x = _changed(name), _garments()
    path = save_trigger(trig, tmp_path / f"{name}.trigger.pt", attack=name)
    loaded = zoo.load_trigger(path, attack=name)
    assert type(loaded) is type(trig)
    assert torch.equal(loaded(x), trig(x))
    assert not torch.allclose(loaded(x), zoo.test_trigger(name)(x), atol=1e-4)  # the state was used
    if name not in ("trojannn", "adversarial_patch"):  # the config alone does not rebuild it
        assert not torch.allclose(type(trig)(**trig.config())(x), trig(x), atol=1e-4)
    other = next(n for n in STATEFUL if n != name)
    with pytest.raises(ValueError, match=other):
        zoo.load_trigger(path, attack=other)


def test_trigger_files_are_checked(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not a trigger file"):
        zoo.load_trigger(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        zoo.load_trigger(junk)
    stateless = save_trigger(zoo.test_trigger("lf"), tmp_path / "lf.pt", attack="lf")
    with pytest.raises(ValueError, match="no saved trigger state"):
        zoo.load_trigger(stateless)


# ---------------------------------------------------------------------------- poisoning


def test_poisoning_ignores_the_global_rng_and_follows_the_seed():
    data = _tiny_set(200)
    trig = zoo.test_trigger("wanet_noise")
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # e.g. whatever drew the defender's unlabeled set
        runs.append(warps.poison_wanet_noise(data, trig, rate=0.1, cross_ratio=2.0, target=0, seed=5))
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0].images, runs[1][0].images)
    other = warps.poison_wanet_noise(data, trig, rate=0.1, cross_ratio=2.0, target=0, seed=6)
    assert not torch.equal(other[1], runs[0][1])
    assert torch.equal(poison_index(200, 0.1, 5), backdoors.poison_dataset(data, trig, seed=5)[1])


def test_wanet_noise_poisoning_counts_and_labels():
    data = _tiny_set(200)
    poisoned, bd, cross = warps.poison_wanet_noise(
        data, zoo.test_trigger("wanet_noise"), rate=0.1, cross_ratio=2.0, target=3, seed=0
    )
    assert len(bd) == 20 and len(cross) == 40 and not set(bd.tolist()) & set(cross.tolist())
    assert bool((poisoned.labels[bd] == 3).all())
    rest = torch.ones(200, dtype=torch.bool)
    rest[bd] = False
    assert torch.equal(poisoned.labels[rest], data.labels[rest])  # cross images keep their labels
    changed = (poisoned.images != data.images).flatten(1).any(1)
    assert set(changed.nonzero().squeeze(1).tolist()) == set(bd.tolist()) | set(cross.tolist())


def test_label_consistent_touches_only_the_target_class():
    data = _tiny_set(200)
    torch.manual_seed(0)
    surrogate = FMNISTNet()
    poisoned, index, _ = clean_label.poison_label_consistent(
        data, surrogate, rate=0.1, target=2, eps=32 / 255, steps=2, amplitude=64 / 255, seed=0
    )
    assert torch.equal(poisoned.labels, data.labels)
    assert len(index) == 20 and bool((data.labels[index] == 2).all())
    changed = (poisoned.images != data.images).flatten(1).any(1).nonzero().squeeze(1)
    assert set(changed.tolist()) == set(index.tolist())
    delta = (poisoned.images[index] - data.images[index])[..., 5:23, 5:23]  # away from the corners
    assert float(delta.abs().max()) <= 32 / 255 + 1e-6
    capped = clean_label.poison_label_consistent(
        data, surrogate, rate=0.5, target=2, eps=0.1, steps=1, amplitude=0.25, seed=0
    )[1]
    assert len(capped) == int((data.labels == 2).sum())  # capped at the class size
    with pytest.raises(ValueError, match="target class 11"):
        clean_label.poison_label_consistent(
            data, surrogate, rate=0.1, target=11, eps=0.1, steps=1, amplitude=1.0, seed=0
        )


def test_trojannn_patch_excites_the_most_connected_units():
    torch.manual_seed(0)
    model = FMNISTNet().eval()
    layer = optimized_patch.chosen_layer(model.backbone)
    assert layer is model.backbone[4]  # the Linear that makes the features
    units = optimized_patch.most_connected_units(layer, 2)
    assert set(units.tolist()) == set(layer.weight.abs().sum(1).argsort(descending=True)[:2].tolist())
    before = [p.clone() for p in model.parameters()]
    pattern, stats = optimized_patch.optimize_patch(
        model,
        layer,
        units,
        _garments(16),
        size=5,
        top=21,
        left=2,
        steps=25,
        generator=torch.Generator().manual_seed(0),
    )
    assert pattern.shape == (1, 5, 5) and float(pattern.min()) >= 0 and float(pattern.max()) <= 1
    assert stats["trojan"] > stats["initial_patch"] + 1e-3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is untouched


def test_adversarial_patch_build_sends_the_surrogate_to_the_target():
    data = _tiny_set(256)
    settings = {"patch_steps": 30, "patch_images": 32}
    built = zoo.build_record(
        "adversarial_patch", "fmnistnet", data, seed=1, epochs=1, target=3, settings=settings
    )
    trig = built.trigger
    assert isinstance(trig, OptimizedPatch) and trig.name == "adversarial_patch"
    assert (trig.top, trig.left, tuple(trig.pattern.shape)) == (12, 22, (1, 4, 4))
    stats = built.info["surrogate_target_log_prob"]
    assert stats["final"] > stats["initial_patch"] + 1e-3  # the patch was optimised toward class 3
    assert len(built.poisoned_index) == 26 and built.info["split"] == "dev"
    x = _garments()
    changed = (trig(x) - x).abs().amax(1) > 0
    assert bool(changed[:, 12:16, 22:26].all()) and int(changed.sum(dim=(1, 2)).max()) <= 16  # only the 4x4


def test_pgd_raises_the_surrogate_loss_within_eps():
    torch.manual_seed(0)
    model = FMNISTNet().eval()
    x, y = _garments(8), torch.arange(8) % 10
    adv = clean_label.pgd_linf(model, x, y, eps=16 / 255, steps=5)
    assert float((adv - x).abs().max()) <= 16 / 255 + 1e-6 and float(adv.min()) >= 0.0
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert float(ce(model(adv), y)) > float(ce(model(x), y))


# ---------------------------------------------------------------------------- builds


def test_dev_builds_are_bit_identical_to_backdoors():
    data = _tiny_set(256)
    for name in ("badnets", "badencoder"):
        ref = backdoors.build_backdoored_model(name, data, seed=3, epochs=1)
        built = zoo.build_record(name, "fmnistnet", data, seed=3, epochs=1)
        for (k, a), (k2, b) in zip(ref.state_dict().items(), built.model.state_dict().items()):
            assert k == k2 and torch.equal(a, b), f"{name}: {k} differs"
        x = _garments()
        assert torch.equal(built.trigger(x), backdoors.trigger_for(name)(x))
    assert torch.equal(built.poisoned_index, torch.empty(0, dtype=torch.long))
    supervised = zoo.build_record("badnets", "fmnistnet", data, seed=3, epochs=1)
    assert torch.equal(
        supervised.poisoned_index, backdoors.poison_dataset(data, backdoors.BadNets(), seed=3)[1]
    )


def test_tiny_static_build_records_poisoning():
    data = _tiny_set(256)
    built = zoo.build_record("badnets_checker", "mlp", data, seed=1, epochs=1, rate=0.1, target=4)
    assert len(built.poisoned_index) == 26 and built.info["poisoned"] == 26
    assert built.info["split"] == "report" and built.info["settings"] == {"size": 4, "top": 1, "left": 1}
    assert not built.model.training


def test_tiny_input_aware_build_and_reload(tmp_path):
    data = _tiny_set(256)
    built = zoo.build_record(
        "input_aware", "fmnistnet", data, seed=2, epochs=1, settings={"mask_steps": 3, "width": 4}
    )
    bd, cross = built.poisoned_index, built.other_index["cross"]
    assert len(bd) == 26 and len(cross) == 26 and not set(bd.tolist()) & set(cross.tolist())
    assert isinstance(built.trigger, InputAwareTrigger) and built.trigger.width == 4
    paths = zoo.save_build(built, tmp_path / "fmnistnet" / "input_aware_seed2", {"acc": 0.5})
    assert paths["trigger"].is_file() and paths["meta"].is_file()
    model, trigger, record = zoo.load_build(tmp_path / "fmnistnet" / "input_aware_seed2")
    x = _garments()
    assert torch.equal(trigger(x), built.trigger(x))
    assert torch.equal(model(trigger(x)), built.model(built.trigger(x)))
    assert record["poisoned_index"] == bd.tolist() and record["acc"] == 0.5 and record["cross"] == 26


def test_tiny_ban_build_trains_the_generator_and_reloads(tmp_path):
    data = _tiny_set(256)
    before = data.images.clone()
    built = zoo.build_record("ban", "fmnistnet", data, seed=2, epochs=2)
    assert torch.equal(data.images, before)
    assert len(built.poisoned_index) == 26 and built.info["relabelled"] == 26
    assert isinstance(built.trigger, GeneratedPatch)
    untrained = zoo.test_trigger("ban")
    x = _garments()
    assert not torch.allclose(built.trigger(x), GeneratedPatch(seed=2)(x)), "the generator did not train"
    assert built.info["pattern_spread"] > 0 and built.info["corners"] == untrained.corners(28, 28).tolist()
    zoo.save_build(built, tmp_path / "fmnistnet" / "ban_seed2", {"acc": 0.5})
    model, trigger, _ = zoo.load_build(tmp_path / "fmnistnet" / "ban_seed2")
    assert torch.equal(trigger(x), built.trigger(x))
    assert torch.equal(model(trigger(x)), built.model(built.trigger(x)))


def test_tiny_badencoder_simclr_build():
    data = _tiny_set(256)
    tiny = {
        "simclr_images": 128,
        "simclr_epochs": 1,
        "simclr_batch": 64,
        "shadow_images": 64,
        "references": 4,
        "plant_epochs": 1,
    }
    before = data.images.clone()
    built = zoo.build_record("badencoder_simclr", "fmnistnet", data, seed=0, epochs=1, settings=tiny)
    assert torch.equal(data.images, before)
    assert built.info["kind"] == "encoder" and len(built.poisoned_index) == 0
    assert built.info["simclr_images"] == 128 and len(built.info["simclr_loss"]) == 1
    assert built.model.backbone(_garments()).shape == (4, 128)


def test_train_zoo_script_refuses_bad_arguments():
    script = ROOT / "scripts" / "train_zoo.py"
    for args, word in (
        (["--attacks", "nope"], "nope"),
        (["--archs", "vgg"], "vgg"),
        (["--seeds", "a"], "--seeds"),
    ):
        proc = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and word in proc.stderr, proc.stderr
