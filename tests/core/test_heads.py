"""The head that reads the purified features (cbd_fast/core/heads.py) and the health check's
changed predictions (``health_head_change``, cbd_fast/core/health.py).

The figure is the share of held-out images whose predicted class the known head changes; with a
head it is acted on instead of the pseudo classes' estimate. A head comes from the caller (a
callable, used as given and never modified), by name (verified against the model's output), or from
a timm / torchvision / Hugging Face classifier (verified; else none). Real families:
``tests/core/test_backbones.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math

import pytest
import torch
from torch import nn

import cbd_fast
from cbd_fast.core.checkpoint import CheckpointError
from cbd_fast.core.heads import FeatureHead, check_head_argument, resolve_head
from cbd_fast.core.health import HealthCheck, HealthError
from tests.core.test_backbones import FakeHFClassifier, FakeTimmNet, FakeTorchvisionNet


def _nullcontext():
    return contextlib.nullcontext()


class Classifier(nn.Module):
    """A small classifier: ``backbone`` -> 6-d features -> ``head`` (4 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6)
        )
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _backbone_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.backbone(x)


# ------------------------------------------------------------------------------------------ the figure


def _check(head: FeatureHead | None, n: int = 200, **kw) -> HealthCheck:
    torch.manual_seed(0)
    z0 = torch.randn(n, 2)
    return HealthCheck(images=torch.zeros(n, 1, 2, 2), reference=z0, head=head, **kw)


def _sign_head() -> FeatureHead:
    """Two classes: the sign of the first feature."""
    return FeatureHead(lambda z: torch.stack([z[:, 0], -z[:, 0]], 1), None, "sign")


def test_head_change_is_the_share_of_changed_predictions():
    check = _check(_sign_head())
    z0 = check.reference
    assert check.figures(z0.clone())["health_head_change"] == 0.0
    z = z0.clone()
    flipped = z[:, 0].argsort()[:30]  # the 30 most negative: move them to the other side
    z[flipped, 0] = -z[flipped, 0]
    assert check.figures(z)["health_head_change"] == pytest.approx(30 / 200)
    # a move along the other feature changes no prediction, however far (the pseudo classes do move)
    far = z0.clone()
    far[:, 1] += 5.0 * far[:, 1].sign()
    figures = check.figures(far)
    assert figures["health_head_change"] == 0.0 and figures["health_flip"] > 0.05
    # not finite: every prediction counts as changed
    bad = z0.clone()
    bad[0, 0] = math.nan
    assert check.figures(bad)["health_head_change"] == 1.0


def test_without_a_head_there_is_no_head_figure_and_the_flip_limit_acts():
    check = _check(None, max_flip=0.01)
    far = check.reference.clone() * torch.tensor([1.0, -1.0])
    figures = check.figures(far)
    assert "health_head_change" not in figures
    assert any(p.startswith("pseudo-class") for p in check.problems(figures))


def test_with_a_head_its_limit_replaces_the_flip_limit():
    check = _check(_sign_head(), max_flip=0.01, max_head_change=0.1)
    z0 = check.reference
    mirrored = z0 * torch.tensor([1.0, -1.0])  # many pseudo classes change, no prediction does
    figures = check.figures(mirrored)
    assert figures["health_flip"] > 0.01 and figures["health_head_change"] == 0.0
    assert check.problems(figures) == [] or all(not p.startswith("pseudo") for p in check.problems(figures))
    z = z0.clone()
    z[:, 0] = -z[:, 0]  # every prediction changes
    problems = check.problems(check.figures(z))
    assert any(p.startswith("changed predictions 1.000 > 0.1") for p in problems)
    # judged on the returned encoder only, and with at least 128 held-out images only
    assert not any(p.startswith("changed") for p in check.problems(check.figures(z), final=False))
    small = _check(_sign_head(), n=100, max_head_change=0.1)
    z = small.reference.clone()
    z[:, 0] = -z[:, 0]
    assert not any(p.startswith("changed") for p in small.problems(small.figures(z)))


# ------------------------------------------------------------------------------------------ resolving


def test_head_argument_kinds():
    for ok in (None, False, "fc", nn.Linear(2, 2), lambda z: z):
        check_head_argument(ok)
    for bad in (True, 3, 1.5, ["fc"]):
        with pytest.raises(TypeError, match="head must be None"):
            check_head_argument(bad)


def test_a_given_head_is_copied_and_used_as_given():
    head = nn.Linear(6, 4)
    got = resolve_head(head, nn.Identity(), None, None, torch.rand(4, 6), _nullcontext)
    assert got is not None and got.module is not head and got.in_shape is None
    z = torch.randn(5, 6)
    assert torch.equal(got(z), head(z).detach())
    assert all(p.requires_grad for p in head.parameters())  # the caller's module: untouched
    assert resolve_head(False, Classifier(), None, None, torch.rand(4, 1, 4, 4), _nullcontext) is None


def test_a_head_by_name_is_verified_against_the_model_output():
    torch.manual_seed(0)
    model = Classifier().train()
    x = torch.rand(8, 1, 4, 4)
    got = resolve_head("head", model, _backbone_features, None, x, _nullcontext)
    assert got is not None and got.in_shape == (6,)
    with torch.no_grad():
        assert torch.allclose(got(model.backbone(x)), model(x), atol=1e-6)
    assert model.training  # the flags are restored
    with pytest.raises(ValueError, match="'nope' is not a submodule of Classifier"):
        resolve_head("nope", model, _backbone_features, None, x, _nullcontext)

    def other_features(module, x):  # not what the head reads
        return module.backbone(x) * 2.0

    with pytest.raises(ValueError, match="head 'head' cannot be used: head\\(features\\) differs"):
        resolve_head("head", model, other_features, None, x, _nullcontext)


@pytest.mark.parametrize("make", [FakeTorchvisionNet, FakeHFClassifier])
def test_a_known_family_head_is_found_and_verified(make):
    torch.manual_seed(0)
    model = make().eval()
    fn = cbd_fast.core.backbones.auto_feature_fn(model)
    x = torch.rand(6, 3, 8, 8)
    got = resolve_head(None, model, fn, None, x, _nullcontext)
    assert got is not None
    with torch.no_grad():
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out["logits"]
        assert torch.equal(got.predict(fn(model, x)), logits.argmax(1))


class _TimmWithClassifier(FakeTimmNet):
    def get_classifier(self) -> nn.Module:
        return self.head


_TimmWithClassifier.__module__ = "timm.models.fake"


class _TimmReadingSomethingElse(_TimmWithClassifier):
    """A classifier whose head does not read the pre-logits features (another scale)."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(3 * x)


_TimmReadingSomethingElse.__module__ = "timm.models.fake"


def test_an_unverifiable_family_head_is_not_used(caplog):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    good = _TimmWithClassifier().eval()
    fn = cbd_fast.core.backbones.auto_feature_fn(good)
    assert resolve_head(None, good, fn, None, x, _nullcontext) is not None
    assert resolve_head(None, FakeTimmNet().eval(), fn, None, x, _nullcontext) is None  # no get_classifier
    with caplog.at_level(logging.INFO, logger="cbd_fast.core.heads"):
        assert resolve_head(None, _TimmReadingSomethingElse().eval(), fn, None, x, _nullcontext) is None
    assert "not used by the health check" in caplog.text and "differs" in caplog.text
    # a headless module of no known family: nothing to resolve
    assert resolve_head(None, nn.Conv2d(3, 2, 3), None, None, x, _nullcontext) is None


# ------------------------------------------------------------------------------------------ through purify

RUN = dict(epochs=1, batch_size=64, steps=1, adversary="pgd", progress=False, seed=0)


def test_purify_records_the_head_figure_and_leaves_the_callers_head_alone():
    torch.manual_seed(0)
    model = Classifier()
    head = model.head.train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.rand(400, 1, 4, 4)
    res = cbd_fast.Purifier(**RUN).fit(model.backbone, x, head=head)
    assert 0.0 <= res.history[-1]["health_head_change"] <= 1.0
    assert head.training and all(p.requires_grad and p.grad is None for p in head.parameters())
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    # the same run with the whole classifier and the head by name: the same figure
    res2 = cbd_fast.Purifier(**RUN).fit(model, x, feature_fn=_backbone_features, head="head")
    assert res2.history[-1]["health_head_change"] == res.history[-1]["health_head_change"]
    assert res.head == "given head Linear" and res2.head == "Classifier.head"
    # none given, none known: no figure; with the head term off the head only reads (same encoder)
    plain = cbd_fast.Purifier(**RUN).fit(model.backbone, x)
    assert "health_head_change" not in plain.history[-1]
    read_only = cbd_fast.Purifier(**RUN, head_weight=0.0).fit(model.backbone, x, head=head)
    assert all(
        torch.equal(v, plain.encoder.state_dict()[k]) for k, v in read_only.encoder.state_dict().items()
    )


def test_a_run_that_changes_too_many_predictions_is_stopped():
    """A head that reads a knife edge of the features: the run stays within the default shape and
    drift limits (the flip limit, which a head replaces, is off) yet changes a quarter of the
    predictions, and is stopped by this limit alone."""
    torch.manual_seed(0)
    model = Classifier()
    x = torch.rand(1500, 1, 4, 4)
    with torch.no_grad():
        z0 = model.backbone(x)
    edge = float(z0[:, 0].median())

    def knife(z: torch.Tensor) -> torch.Tensor:
        return torch.stack([z[:, 0] - edge, edge - z[:, 0]], 1) * 100.0

    cfg = dict(RUN, lr=0.015, health_max_flip=math.inf, head_weight=0.0)  # the limit alone
    with pytest.raises(HealthError, match=r"changed predictions 0\.\d+ > 0\.12 .*health_max_head_change"):
        cbd_fast.Purifier(**cfg).fit(model.backbone, x, head=knife)
    res = cbd_fast.Purifier(**cfg).fit(model.backbone, x, head=False)  # the same run without the head
    assert "health_head_change" not in res.history[-1]
    relaxed = cbd_fast.Purifier(**cfg, health_max_head_change=1.0).fit(model.backbone, x, head=knife)
    assert relaxed.history[-1]["health_head_change"] > 0.12


def test_bad_head_arguments_fail_before_training():
    model = Classifier()
    x = torch.rand(64, 1, 4, 4)
    with pytest.raises(TypeError, match="head must be None .* got int 3"):
        cbd_fast.purify(model.backbone, x, head=3, **RUN)
    with pytest.raises(ValueError, match="head 'fc' is not a submodule of Classifier"):
        cbd_fast.purify(model, x, feature_fn=_backbone_features, head="fc", **RUN)


# ------------------------------------------------------------------------------------------ head_weight


def test_head_weight_needs_a_head_and_the_steps_attack():
    model = Classifier()
    x = torch.rand(64, 1, 4, 4)
    with pytest.raises(ValueError, match="head_weight=1.0 needs the head that reads the features"):
        cbd_fast.purify(model.backbone, x, head_weight=1.0, **RUN)
    with pytest.raises(ValueError, match="prepare / step take none"):
        cbd_fast.Purifier(head_weight=1.0).prepare(model.backbone)
    with pytest.raises(ValueError, match="head_weight > 0 needs the steps-step attack; .* free_replays=2"):
        cbd_fast.PurifyConfig(head_weight=1.0, free_replays=2).validate()
    with pytest.raises(ValueError, match="head_weight must be >= 0"):
        cbd_fast.PurifyConfig(head_weight=-1.0).validate()


@pytest.mark.parametrize("head_clean", [False, True])
def test_head_weight_pulls_the_adversarial_predictions_to_the_original_ones(head_clean):
    """The head term: KL of the head's predictions on the adversarial (and, with head_clean, the
    clean) features from its predictions on the original's clean features; it changes the run."""
    torch.manual_seed(0)
    model = Classifier()
    x = torch.rand(400, 1, 4, 4)
    base = cbd_fast.Purifier(**RUN, head_weight=0.0).fit(model.backbone, x, head=model.head)
    res = cbd_fast.Purifier(**RUN, head_weight=1.0, head_clean=head_clean).fit(
        model.backbone, x, head=model.head
    )
    assert res.history[-1]["loss"] != base.history[-1]["loss"]
    assert any(not torch.equal(v, base.encoder.state_dict()[k]) for k, v in res.encoder.state_dict().items())
    assert all(p.requires_grad for p in model.head.parameters())  # the caller's head: untouched


def test_auto_weights_turn_the_head_term_on_only_with_a_head():
    """``head_weight`` / ``clean_weight`` "auto": 1 and 100 with a head, 0 and 50 without one (and
    under ``free_replays``); numbers are used as given; the defaults with a head equal the explicit
    numbers, and without one the explicit head_weight=0, clean_weight=50."""
    cfg = cbd_fast.PurifyConfig()
    assert (cfg.head_weight, cfg.clean_weight, cfg.head_clean) == ("auto", "auto", True)
    assert cfg.loss_weights(True) == (1.0, 100.0) and cfg.loss_weights(False) == (0.0, 50.0)
    assert cfg.replace(free_replays=2).loss_weights(True) == (0.0, 50.0)
    assert cfg.replace(clean_weight=7.0).loss_weights(True) == (1.0, 7.0)
    assert cfg.replace(head_weight=0.0).loss_weights(True) == (0.0, 50.0)
    assert cbd_fast.PurifyConfig.paper().loss_weights(True) == (0.0, 0.0)
    torch.manual_seed(0)
    model = Classifier()
    x = torch.rand(400, 1, 4, 4)
    auto = cbd_fast.Purifier(**RUN).fit(model.backbone, x, head=model.head)
    explicit = dict(RUN, head_weight=1.0, clean_weight=100.0)
    given = cbd_fast.Purifier(**explicit).fit(model.backbone, x, head=model.head)
    assert (auto.runtime["head_weight"], auto.runtime["clean_weight"]) == (1.0, 100.0)
    assert all(torch.equal(v, given.encoder.state_dict()[k]) for k, v in auto.encoder.state_dict().items())
    none = cbd_fast.Purifier(**RUN).fit(model.backbone, x)
    off = cbd_fast.Purifier(**RUN, head_weight=0.0, clean_weight=50.0).fit(model.backbone, x, head=model.head)
    assert (none.runtime["head_weight"], none.runtime["clean_weight"]) == (0.0, 50.0)
    assert all(torch.equal(v, off.encoder.state_dict()[k]) for k, v in none.encoder.state_dict().items())
    with pytest.raises(TypeError, match="head_weight must be 'auto' or a real number; got 'on'"):
        cbd_fast.PurifyConfig(head_weight="on").validate()
    with pytest.raises(ValueError, match="clean_weight must be >= 0; got -1"):
        cbd_fast.PurifyConfig(clean_weight=-1).validate()


def test_resume_refuses_a_checkpoint_written_with_other_loss_weights(tmp_path):
    """A run with the head term, interrupted, cannot be resumed without its head (the weights would
    change mid-run)."""
    torch.manual_seed(0)
    model = Classifier()
    x = torch.rand(400, 1, 4, 4)
    cfg = dict(RUN, epochs=2, checkpoint_dir=tmp_path)
    cbd_fast.Purifier(**cfg).fit(model.backbone, x, head=model.head)
    weights = r"loss weights .* \(1\.0, 100\.0\), this run resolves \(0\.0, 50\.0\)"
    with pytest.raises(CheckpointError, match=weights):
        cbd_fast.Purifier(**cfg, resume=True).fit(model.backbone, x)
    again = cbd_fast.Purifier(**cfg, resume=True).fit(model.backbone, x, head=model.head)
    assert len(again.history) == 2
