"""``PurifyConfig.input_mean`` / ``input_std``: a backbone trained on standardised images is purified
on [0, 1] images with the standardisation in front of every forward, exactly as if it were part of
the model, and returned without it."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from torch import nn

from cbd_fast import PurifyConfig, purify
from cbd_fast.core.backbones import StandardisedInputs, describe_features, standardisation_hint

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FAST = dict(epochs=1, batch_size=8, steps=2, progress=False)


class RGBEncoder(nn.Module):
    """Conv + BatchNorm encoder for 3x12x12 images -> 16-d features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Standardise(nn.Module):
    """The same standardisation written into the model by hand (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


class TimmLike(RGBEncoder):
    """An encoder that declares its expected standardisation the way timm models do."""

    pretrained_cfg = {"mean": MEAN, "std": STD, "num_classes": 0}


def _encoder() -> RGBEncoder:
    torch.manual_seed(0)
    return RGBEncoder()


def _images(n: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(3))


def test_same_run_as_the_standardisation_inside_the_model() -> None:
    enc = _encoder()
    data = _images()
    inside = purify(nn.Sequential(Standardise(), enc), data, **FAST)
    outside = purify(enc, data, input_mean=MEAN, input_std=STD, **FAST)
    assert type(outside) is RGBEncoder  # returned without the step
    moved = max((a - b).abs().max().item() for a, b in zip(outside.parameters(), enc.parameters()))
    assert moved > 1e-3  # the run trained
    for a, b in zip(outside.state_dict().values(), inside[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and not the run without it: the encoder sees other inputs
    plain = purify(enc, data, **FAST)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(plain.parameters(), outside.parameters()))


def test_one_value_for_every_channel_and_identity_skipped() -> None:
    enc, data = _encoder(), _images(16)
    kw = dict(FAST, epochs=1)
    one = purify(enc, data, input_mean=(0.5,), input_std=(0.25,), **kw)
    three = purify(enc, data, input_mean=(0.5,) * 3, input_std=(0.25,) * 3, **kw)
    for a, b in zip(one.parameters(), three.parameters()):
        torch.testing.assert_close(a, b)
    ident = purify(enc, data, input_mean=(0.0,), input_std=(1.0,), **kw)
    plain = purify(enc, data, **kw)
    for a, b in zip(ident.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_channel_count_mismatch_is_refused_before_training() -> None:
    enc = _encoder()
    snap = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(ValueError, match=r"2 value\(s\) per channel.*\(8, 3, 12, 12\)"):
        purify(enc, _images(16), input_mean=(0.5, 0.5), input_std=(0.2, 0.2), **FAST)
    assert all(torch.equal(v, snap[k]) for k, v in enc.state_dict().items())


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(input_mean=MEAN), ValueError, "both or neither"),
        (dict(input_mean=MEAN, input_std=(0.2, 0.2)), ValueError, "3 and 2"),
        (dict(input_mean=MEAN, input_std=(0.2, 0.0, 0.2)), ValueError, "input_std must be > 0"),
        (dict(input_mean=(0.5, float("nan"), 0.5), input_std=STD), ValueError, "input_mean must be finite"),
        (dict(input_mean="rgb", input_std=STD), TypeError, "per-channel numbers; got 'rgb'"),
        (dict(input_mean=(), input_std=()), TypeError, "non-empty"),
    ],
)
def test_bad_values_name_the_field_and_value(kw: dict, exc: type, words: str) -> None:
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        PurifyConfig(**kw).validate()


def test_values_are_stored_as_float_tuples() -> None:
    cfg = PurifyConfig(input_mean=torch.tensor([0.5, 0.4, 0.3]), input_std=[1, 2, 3]).validate()
    assert cfg.input_mean == pytest.approx((0.5, 0.4, 0.3)) and cfg.input_std == (1.0, 2.0, 3.0)
    assert isinstance(cfg.input_mean, tuple) and cfg.to_dict()["input_std"] == (1.0, 2.0, 3.0)


def test_standardised_data_gets_a_hint() -> None:
    data = (_images(16) - 0.45) / 0.22
    with pytest.raises(ValueError, match="must be in \\[0, 1\\].*input_mean"):
        purify(_encoder(), data, **FAST)


def test_a_model_that_declares_its_standardisation_gets_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert standardisation_hint(RGBEncoder()) is None
    hint = standardisation_hint(TimmLike())
    assert hint is not None and "input_mean=(0.485, 0.456, 0.406)" in hint
    with caplog.at_level(logging.WARNING, logger="cbd_fast"):
        purify(TimmLike(), _images(16), **FAST)
    assert any("declares input standardisation" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cbd_fast"):
        purify(TimmLike(), _images(16), input_mean=MEAN, input_std=STD, **FAST)
    assert not any("declares input standardisation" in r.getMessage() for r in caplog.records)


def test_extractor_describes_itself_and_pickles_without_its_cache() -> None:
    fn = StandardisedInputs(MEAN, STD, None)
    enc = _encoder().eval()
    x = _images(4)
    torch.testing.assert_close(fn(enc, x), enc(Standardise()(x)))
    assert fn._consts  # the constants are cached after a call ...
    again = pickle.loads(pickle.dumps(fn))
    assert again._consts == {} and again.mean == MEAN  # ... and not pickled
    text = describe_features(fn, 16)
    assert "the module's output, inputs standardised (mean 0.485, 0.456, 0.406" in text and text.endswith(
        "16-d"
    )


def test_resume_accepts_its_own_checkpoint(tmp_path) -> None:  # noqa: ANN001
    kw = dict(FAST, epochs=2, input_mean=MEAN, input_std=STD, checkpoint_dir=str(tmp_path))
    full = purify(_encoder(), _images(16), **kw)
    resumed = purify(_encoder(), _images(16), resume=True, **kw)  # the config read back equals this one
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
