"""PurifyConfig.adversary_options: defaults, validation (key, type, range), no mutation, effect, CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbd_fast import Purifier, PurifyConfig
from cbd_fast.app.cli import parse_set_options
from cbd_fast.core.adversaries import ADVERSARIES, Adversary, make_adversary

PW = "pgd_patch_warp"  # most tests here exercise this adversary's options (the previous default)


def test_defaults_fill_in_and_are_declared() -> None:
    adv = make_adversary(PurifyConfig(adversary=PW).validate())
    assert adv.options == {k: o.default for k, o in type(adv).OPTIONS.items()}
    assert adv.options["warp_pixels"] == 1.5 and adv.options["warp_restarts"] == 4
    for cls in ADVERSARIES.values():  # every declared option has a doc line for the error messages
        assert all(o.doc for o in cls.OPTIONS.values()), cls.name


def test_user_values_reach_the_adversary_and_the_dict_is_not_touched() -> None:
    opts = {"warp_pixels": 2, "patch_candidates": 2.0}
    cfg = PurifyConfig(adversary=PW, adversary_options=opts).validate()
    adv = make_adversary(cfg)
    assert adv.options["warp_pixels"] == 2.0 and isinstance(adv.options["warp_pixels"], float)
    assert adv.options["patch_candidates"] == 2 and isinstance(adv.options["patch_candidates"], int)
    assert opts == {"warp_pixels": 2, "patch_candidates": 2.0}  # unchanged
    assert cfg.adversary_options is not opts
    assert cfg.to_dict()["adversary_options"] == opts


@pytest.mark.parametrize(
    ("adversary", "options", "exc", "words"),
    [
        (
            "pgd_patch_warp",
            {"warp_pixel": 1.0},
            ValueError,
            ["'warp_pixel'", "warp_pixels", "pgd_patch_warp"],
        ),
        ("pgd", {"warp_pixels": 1.0}, ValueError, ["'warp_pixels'", "'pgd'", "none"]),
        ("pgd_patch", {"warp_restarts": 2}, ValueError, ["'warp_restarts'", "patch_fraction"]),
        ("pgd_patch_warp", {"warp_pixels": -1.0}, ValueError, ["warp_pixels", "-1.0", ">= 0"]),
        ("pgd_patch_warp", {"warp_restarts": 0}, ValueError, ["warp_restarts", "0"]),
        ("pgd_patch_warp", {"warp_restarts": 1.5}, TypeError, ["warp_restarts", "1.5", "integer"]),
        ("pgd_patch_warp", {"warp_pixels": "2"}, TypeError, ["warp_pixels", "'2'"]),
        ("pgd_patch_warp", {"warp_pixels": True}, TypeError, ["warp_pixels", "True"]),
        ("pgd_patch_warp", {"warp_pixels": float("nan")}, ValueError, ["warp_pixels", "nan"]),
        ("pgd_patch", {"patch_fraction": 1.5}, ValueError, ["patch_fraction", "<= 1", "1.5"]),
        ("pgd_patch_warp", [("warp_pixels", 1.0)], TypeError, ["adversary_options", "list"]),
    ],
)
def test_bad_options_name_the_key_and_value(adversary, options, exc, words) -> None:
    with pytest.raises(exc) as info:
        PurifyConfig(adversary=adversary, adversary_options=options).validate()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_none_for_a_derived_option_is_accepted() -> None:
    cfg = PurifyConfig(adversary=PW, adversary_options={"patch_size": None, "warp_steps": None}).validate()
    assert make_adversary(cfg).options["patch_size"] is None


def test_options_change_the_run() -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    x = torch.rand(24, 1, 12, 12)
    kw = dict(epochs=1, batch_size=12, progress=False, seed=3, adversary=PW)
    a = Purifier(**kw).fit(enc, x)
    b = Purifier(**kw, adversary_options={"warp_pixels": 1.5}).fit(enc, x)  # = the default
    c = Purifier(**kw, adversary_options={"warp_pixels": 3.0, "warp_restarts": 1}).fit(enc, x)
    flat = [torch.cat([p.flatten() for p in r.encoder.parameters()]) for r in (a, b, c)]
    assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2])


def test_custom_adversary_without_options_rejects_any() -> None:
    class Plain(Adversary):
        name = "plain"

    with pytest.raises(ValueError, match="its settings: none"):
        Plain.check_options({"x": 1})
    assert Plain.check_options(None) == {}


def test_cli_set_parses_a_dict() -> None:
    out = parse_set_options(['adversary_options={"warp_pixels": 2.5}'])
    assert out == {"adversary_options": {"warp_pixels": 2.5}}
    PurifyConfig(adversary=PW, **out).validate()


def test_patch_and_warp_shares_must_leave_room() -> None:
    with pytest.raises(ValueError, match=r"patch_fraction \+ warp_fraction.*0.6 \+ 0.5"):
        PurifyConfig(adversary=PW, adversary_options={"patch_fraction": 0.6, "warp_fraction": 0.5}).validate()
    PurifyConfig(
        adversary=PW, adversary_options={"patch_fraction": 0.5, "warp_fraction": 0.5}
    ).validate()  # no PGD


@pytest.mark.parametrize(
    ("n", "batch", "options"),
    [
        (2, 2, None),  # PGD would get 1 image: it joins the warp part
        (5, 2, None),
        (3, 3, None),
        (7, 4, None),
        (4, 4, {"warp_fraction": 0.0, "patch_fraction": 0.5}),
        (4, 4, {"warp_fraction": 0.5, "patch_fraction": 0.5}),
        (3, 3, {"warp_fraction": 0.0, "patch_fraction": 0.0}),
    ],
)
def test_small_batches_and_extreme_shares_run(n, batch, options) -> None:
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    x = torch.rand(n, 1, 12, 12)
    res = Purifier(batch_size=batch, epochs=1, progress=False, adversary=PW, adversary_options=options).fit(
        enc, x
    )
    assert res.history[0]["batches"] >= 1


def test_default_split_of_a_batch() -> None:
    # 128 images: 43 PGD, 21 patch, 64 warp; the adversary returns them in that order, PGD ones within
    # epsilon of the clean images.
    from cbd_fast.core.adversaries import AttackInputs

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    cfg = PurifyConfig(steps=1, adversary=PW).validate()
    x = torch.rand(128, 1, 12, 12)
    with torch.no_grad():
        anchors = enc(x)
    adv = make_adversary(cfg)
    out = adv(AttackInputs(enc, x, anchors, torch.arange(128), 0, None, cfg))
    diff = (out - x).abs().flatten(1).amax(1)
    assert (diff[:43] <= cfg.epsilon + 1e-6).all()
    assert (diff[43:64] > cfg.epsilon).any()  # pasted patches: unbounded amplitude


@pytest.mark.parametrize(("n", "batch"), [(2, 2), (3, 3), (5, 2), (7, 4)])
def test_default_adversary_runs_on_small_batches(n: int, batch: int) -> None:
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    x = torch.rand(n, 1, 12, 12)
    res = Purifier(batch_size=batch, epochs=1, progress=False).fit(enc, x)
    assert res.config.adversary == "trigger_search" and res.history[0]["batches"] >= 1
