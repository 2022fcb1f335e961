"""The label-free health check (core/health.py): its figures, the held-out split, and that a
collapsing run is stopped while a healthy one is not."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import cbd_fast
from cbd_fast import PurifyConfig
from cbd_fast.core.clean_terms import CLEAN_TERMS, CleanTerm, CleanTermInputs, register_clean_term
from cbd_fast.core.health import MIN_FLIP_IMAGES, HealthCheck, HealthError, health_figures, pseudo_classes
from cbd_fast.core.inputs import holdout_split


def _structured_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images from 4 smooth prototypes plus noise: neighbourhoods an encoder can keep."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, 1, 12, 12, generator=g)
    protos = torch.nn.functional.avg_pool2d(protos, 3, 1, 1)
    which = torch.randint(0, 4, (n,), generator=g)
    return (protos[which] + 0.08 * torch.randn(n, 1, 12, 12, generator=g)).clamp(0, 1)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten()
    )


# ---- the figures ---------------------------------------------------------------------------------


def test_figures_of_same_rotated_scaled_random_and_collapsed_features() -> None:
    z0 = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
    same = health_figures(z0.clone(), z0)
    assert same["health_knn"] == 1.0 and same["health_cka"] == pytest.approx(1.0)
    assert same["health_rank"] == pytest.approx(1.0) and same["health_finite"] == 1.0
    q = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))[0]
    for z in (z0 @ q, 100.0 * z0, 0.01 * z0):  # rotation and scale change nothing
        f = health_figures(z, z0)
        assert f["health_knn"] == 1.0 and f["health_cka"] == pytest.approx(1.0, abs=1e-9)
        assert f["health_rank"] == pytest.approx(1.0, abs=1e-6)
    rnd = health_figures(torch.randn(200, 32, generator=torch.Generator().manual_seed(2)), z0)
    assert rnd["health_knn"] < 0.15  # chance is k / (M - 1) = 0.05
    collapsed = health_figures(z0[:, :1].repeat(1, 32), z0)  # one direction left
    assert collapsed["health_rank"] < 0.1
    towards_one_point = health_figures(5.0 + 0.01 * z0, z0)  # layout kept, everything near one point
    assert towards_one_point["health_knn"] > 0.4 and towards_one_point["health_spread"] < 0.01
    bad = health_figures(torch.full((200, 32), float("nan")), z0)
    assert bad.pop("health_drift") == math.inf and bad.pop("health_flip") == 1.0
    assert set(bad.values()) == {0.0}


def test_drift_sees_what_the_shape_figures_cannot() -> None:
    """A rotation, a rescale or a common shift keeps every shape figure but moves the clean features
    away from where a head trained on the original reads them: only ``health_drift`` sees it."""
    z0 = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
    assert health_figures(z0.clone(), z0)["health_drift"] == 0.0
    q = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))[0]
    assert health_figures(z0 @ q, z0)["health_drift"] > 1.0  # about 2 for a random rotation
    assert health_figures(2.0 * z0, z0)["health_drift"] == pytest.approx(1.0)
    assert health_figures(1.1 * z0, z0)["health_drift"] == pytest.approx(0.01)
    assert health_figures(z0 + 0.2, z0)["health_drift"] == pytest.approx(0.04, rel=0.1)
    other_dim = health_figures(torch.randn(200, 16), z0)  # another space: not comparable
    assert math.isnan(other_dim["health_drift"])
    check = HealthCheck(images=torch.zeros(1), reference=z0, max_drift=0.1, max_flip=1.0)
    assert all("drift" not in p for p in check.problems(other_dim))  # NaN never fails
    ok = health_figures(1.1 * z0, z0)
    assert check.problems(ok) == []
    (problem,) = check.problems(health_figures(2.0 * z0, z0))
    assert "feature drift 1.000 > 0.1" in problem
    # an earlier epoch's drift is recorded, not acted on: only the returned encoder is judged
    assert check.problems(health_figures(2.0 * z0, z0), final=False) == []


def test_figures_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"same M >= 3; got \(5, 3\) and \(4, 3\)"):
        health_figures(torch.randn(5, 3), torch.randn(4, 3))


def test_holdout_split_is_a_tenth_at_most_and_deterministic() -> None:
    held, train = holdout_split(3000, 256, seed=0)
    assert len(held) == 256 and len(train) == 2744 and not set(held) & set(train)
    assert holdout_split(3000, 256, seed=0) == (held, train)
    assert holdout_split(3000, 256, seed=1)[0] != held
    assert len(holdout_split(1000, 256, seed=0)[0]) == 100
    assert holdout_split(300, 256, seed=0) == ([], list(range(300)))  # fewer than 32: nothing held


@pytest.mark.parametrize(
    ("field", "value", "exc", "match"),
    [
        ("health", "maybe", ValueError, "health must be one of"),
        ("health_images", 8, ValueError, "health_images must be >= 16; got 8"),
        ("health_min_knn", 1.5, ValueError, r"health_min_knn must be in \[0, 1\]; got 1.5"),
        ("health_min_rank", -0.1, ValueError, "health_min_rank must be >= 0"),
        ("health_max_drift", 0, ValueError, r"health_max_drift must be > 0 \(math.inf turns it off\); got 0"),
        ("health_max_drift", float("nan"), ValueError, "health_max_drift must be > 0"),
        ("health_max_drift", "0.1", TypeError, "health_max_drift must be a real number; got '0.1'"),
        (
            "health_max_flip",
            0,
            ValueError,
            r"health_max_flip must be in \(0, 1\] \(1 or math.inf turns it off\); got 0",
        ),
        ("health_max_flip", -0.5, ValueError, r"health_max_flip must be in \(0, 1\]"),
        ("health_max_flip", float("nan"), ValueError, r"health_max_flip must be in \(0, 1\]"),
        ("health_max_flip", True, TypeError, "health_max_flip must be a real number; got True"),
        ("health_max_flip", "0.1", TypeError, "health_max_flip must be a real number; got '0.1'"),
    ],
)
def test_bad_health_settings_name_the_field(field, value, exc, match) -> None:
    with pytest.raises(exc, match=match):
        PurifyConfig(**{field: value}).validate()


# ---- the guard inside purify ----------------------------------------------------------------------


def test_a_healthy_run_records_the_figures_and_holds_images_out() -> None:
    x = _structured_images(400)
    res = cbd_fast.Purifier(epochs=2, batch_size=32, steps=2, progress=False).fit(_encoder(), x)
    for h in res.history:
        assert h["health_knn"] > 0.5 and h["health_rank"] > 0.5 and h["health_finite"] == 1.0
        assert h["images"] == 360  # 40 of 400 held out for the check


@pytest.fixture
def collapse_term():
    """A clean term that drags every feature to one point: a run that collapses on purpose."""

    @register_clean_term("test_collapse")
    class Collapse(CleanTerm):
        def __call__(self, inp: CleanTermInputs) -> torch.Tensor:
            z = inp.gather(inp.z_clean)
            return (z - 1.0).pow(2).mean()

    yield "test_collapse"
    CLEAN_TERMS.pop("test_collapse")


def _collapsing(**kw):
    x = _structured_images(400)
    # SGD with a large step: a recipe that collapses on purpose (Adam, the default, bounds the step)
    cfg = dict(epochs=2, batch_size=32, steps=1, progress=False, optimizer="sgd", lr=0.05, clean_weight=50.0)
    return lambda: cbd_fast.Purifier(clean_term="test_collapse", **cfg, **kw).fit(_encoder(), x)


def test_a_collapsing_run_is_stopped_with_the_figures(collapse_term, tmp_path) -> None:
    with pytest.raises(HealthError, match=r"after epoch 1/2 .* health check on 40 held-out") as err:
        _collapsing(checkpoint_dir=str(tmp_path))()
    text = str(err.value)
    assert "relative spread" in text and "broken encoder is not returned" in text


def test_health_warn_continues_and_off_measures_nothing(collapse_term) -> None:
    with pytest.warns(RuntimeWarning, match="failed the label-free health check"):
        res = _collapsing(health="warn")()
    assert min(h["health_spread"] for h in res.history) < 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = _collapsing(health="off")()
    assert not any(k.startswith("health") for k in res.history[0])
    assert res.history[0]["images"] == 400  # nothing held out


@pytest.fixture
def scale_term():
    """A clean term that pulls the clean features to twice the original's: every shape figure (k-NN,
    CKA, rank, spread) stays at 1 while a head trained on the original features misreads them."""

    @register_clean_term("test_scale")
    class Scale(CleanTerm):
        needs_reference = True

        def __call__(self, inp: CleanTermInputs) -> torch.Tensor:
            z0 = inp.gather_no_grad(inp.reference_features(inp.x))
            return (inp.gather(inp.z_clean) - 2.0 * z0).pow(2).mean() / z0.pow(2).mean()

    yield "test_scale"
    CLEAN_TERMS.pop("test_scale")


def _drifting(n: int = 400, **kw):
    x = _structured_images(n)
    cfg = dict(epochs=2, batch_size=32, steps=1, progress=False, lr=0.01, clean_weight=50.0)
    return lambda: cbd_fast.Purifier(clean_term="test_scale", **cfg, **kw).fit(_encoder(), x)


def test_a_drifting_run_is_stopped_and_the_limit_can_be_lifted(scale_term) -> None:
    with pytest.raises(HealthError, match=r"after epoch 2/2 .* feature drift \d\.\d{3} > 0.1") as err:
        _drifting()()  # epoch 1 drifts too: recorded, and the run goes on to the encoder it would return
    text = str(err.value)
    assert "raise health_max_drift" in text
    assert "k-NN agreement" not in text and "relative spread" not in text and "rank ratio" not in text
    assert "health_max_flip" in text
    assert "pass it (purify(..., head=...))" in text  # no head known: the advice offers one
    res = _drifting(health_max_drift=math.inf, health_max_flip=math.inf)()  # a new head will be trained
    last = res.history[-1]
    assert res.history[0]["health_drift"] > 0.1  # the stopped run went past its drifting first epoch
    assert last["health_drift"] > 0.1 and last["health_knn"] > 0.5 and last["health_spread"] > 0.5


def test_a_run_whose_images_change_pseudo_class_is_stopped_with_the_drift_limit_lifted(scale_term) -> None:
    """Doubling the features moves images across the boundaries of the original's clusters: the flip
    limit stops the run on its own, and the error names the figure and how to lift it."""
    with pytest.raises(HealthError, match=r"after epoch 2/2 .* pseudo-class changes 0\.\d{3} > 0.12") as err:
        _drifting(n=10 * MIN_FLIP_IMAGES, health_max_drift=math.inf)()  # 128 held out: enough to act on
    assert "feature drift" not in str(err.value) and "health_max_flip" in str(err.value)
    # the same run with 40 held-out images: the figure is recorded, not acted on
    res = _drifting(health_max_drift=math.inf)()
    assert res.history[-1]["health_flip"] > 0.12


# ---- pseudo-class changes -------------------------------------------------------------------------


def _blobs(separation: float, n: int = 300, k: int = 10, d: int = 16) -> torch.Tensor:
    """[n, d] features in ``k`` Gaussian clusters (unit noise) whose centres are ``separation`` apart."""
    g = torch.Generator().manual_seed(0)
    centres = separation / math.sqrt(2) * torch.eye(k, d)  # pairwise distance = separation
    return centres[torch.arange(n) % k] + torch.randn(n, d, generator=g)


def test_flips_see_a_fragile_model_that_the_drift_cannot() -> None:
    """The same relative move of the features (equal drift) flips few images of a model with well
    separated classes and many of one whose classes overlap: the flip figure reads the margins."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, sep in (("robust", 30.0), ("fragile", 3.0)):
        z0 = _blobs(sep)
        noise = torch.randn(z0.shape, generator=g)
        z = z0 + noise * (0.3 * z0.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True))
        out[name] = health_figures(z, z0)
    assert out["robust"]["health_drift"] == pytest.approx(0.09, rel=0.01)
    assert out["fragile"]["health_drift"] == pytest.approx(0.09, rel=0.01)
    assert out["robust"]["health_flip"] == 0.0
    assert out["fragile"]["health_flip"] > 0.05  # 0.107 here, against 0 for the robust model


def test_flip_figure_cases() -> None:
    z0 = _blobs(30.0)
    assert health_figures(z0.clone(), z0)["health_flip"] == 0.0
    labels = torch.arange(len(z0)) % 10
    centres = torch.stack([z0[labels == j].mean(0) for j in range(10)])
    moved = z0.clone()
    moved[:60] = centres[(labels[:60] + 1) % 10]  # 60 of 300 images sent to the next cluster's centre
    assert health_figures(moved, z0)["health_flip"] == pytest.approx(0.2)
    assert math.isnan(health_figures(torch.randn(300, 8), z0)["health_flip"])  # another space
    check = HealthCheck(images=torch.zeros(MIN_FLIP_IMAGES), reference=z0, max_drift=math.inf)
    figs = health_figures(moved, z0, centroids=check.centroids)
    assert figs["health_flip"] == pytest.approx(0.2)
    (problem,) = check.problems(figs)
    assert problem.startswith("pseudo-class changes 0.200 > 0.12")
    assert check.problems(figs, final=False) == []  # an earlier epoch is recorded, not judged
    lifted = HealthCheck(images=torch.zeros(MIN_FLIP_IMAGES), reference=z0, max_flip=1.0, max_drift=math.inf)
    assert lifted.problems(figs) == []
    # with fewer held-out images than MIN_FLIP_IMAGES the figure is too noisy: recorded, not acted on
    few = HealthCheck(images=torch.zeros(MIN_FLIP_IMAGES - 1), reference=z0, max_drift=math.inf)
    assert few.problems(figs) == []


def test_pseudo_classes_are_deterministic_and_survive_degenerate_features() -> None:
    z0 = _blobs(30.0)
    a, b = pseudo_classes(z0), pseudo_classes(z0.clone())
    assert a.shape == (10, 16) and a.dtype == torch.float64 and torch.equal(a, b)
    # every centre found: one centroid per blob
    assert len(set(torch.cdist(z0.double(), a).argmin(1).tolist())) == 10
    assert pseudo_classes(z0[:4]).shape == (4, 16)  # fewer images than clusters
    same = pseudo_classes(torch.ones(50, 8))  # one point repeated: no error, finite centroids
    assert torch.isfinite(same).all()
    assert health_figures(torch.ones(50, 8), torch.ones(50, 8))["health_flip"] == 0.0


def test_flip_limit_defaults_and_presets() -> None:
    assert PurifyConfig().health_max_flip == 0.12
    assert PurifyConfig(health_max_flip=1).validate().health_max_flip == 1.0  # an int is taken as a float
    assert (
        PurifyConfig.paper().health_max_flip == math.inf
    )  # the published method moves the features by design
