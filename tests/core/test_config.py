"""PurifyConfig: defaults, validation messages (field + value), overrides, serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cbd_fast import PurifyConfig
from cbd_fast.core.adversaries import ADVERSARIES
from cbd_fast.core.clean_terms import CLEAN_TERMS


def test_documented_defaults() -> None:
    # epsilon/step_size/lr/adversary/clean term: measured defaults (docs/method.md).
    cfg = PurifyConfig().validate()
    assert cfg.epsilon == pytest.approx(40 / 255)
    assert cfg.step_size == pytest.approx(8 / 255)
    assert cfg.steps == 7 and cfg.adv_fraction == 1.0 and cfg.epochs == 4
    assert cfg.reference_cache == "auto" and cfg.channels_last == "auto"
    assert cfg.temperature == 0.5
    assert cfg.optimizer == "adam" and cfg.lr == 0.0015 and cfg.clean_weight == "auto"
    assert cfg.loss_weights(False) == (0.0, 50.0) and cfg.loss_weights(True) == (1.0, 100.0)
    assert cfg.adversary == "trigger_search"
    assert cfg.health == "stop" and cfg.health_images == 256
    assert cfg.nonfinite == "stop" and cfg.amp_dtype == "auto" and cfg.device == "auto"
    assert cfg.clean_term in CLEAN_TERMS and cfg.adversary in ADVERSARIES


def test_every_field_is_documented() -> None:
    doc = PurifyConfig.__doc__ or ""
    missing = [f.name for f in dataclasses.fields(PurifyConfig) if f"{f.name}:" not in doc]
    assert not missing, f"fields without a docstring entry: {missing}"


@pytest.mark.parametrize(
    ("field", "value", "exc"),
    [
        ("epsilon", -0.1, ValueError),
        ("epsilon", float("nan"), ValueError),
        ("epsilon", "8/255", TypeError),
        ("step_size", -1.0, ValueError),
        ("steps", -1, ValueError),
        ("steps", 2.5, TypeError),
        ("temperature", 0.0, ValueError),
        ("temperature", -0.5, ValueError),
        ("epochs", 0, ValueError),
        ("lr", 0.0, ValueError),
        ("lr", float("inf"), ValueError),
        ("batch_size", 1, ValueError),
        ("batch_size", True, TypeError),
        ("optimizer", "rmsprop", ValueError),
        ("momentum", 1.0, ValueError),
        ("weight_decay", -1e-4, ValueError),
        ("lr_schedule", "linear", ValueError),
        ("clean_term", "l2sp", ValueError),
        ("clean_weight", -1.0, ValueError),
        ("bn_policy", "sync", ValueError),
        ("augmentation", "rotate", ValueError),
        ("crop_padding", -2, ValueError),
        ("seed", -1, ValueError),
        ("amp_dtype", "fp8", ValueError),
        ("channels_last", "yes", ValueError),
        ("compile", "no", TypeError),
        ("backend", "opencl", ValueError),
        ("checkpoint_dir", 3, TypeError),
        ("keep_checkpoints", 0, ValueError),
        ("log_every", 0, ValueError),
        ("num_workers", -1, ValueError),
        ("nonfinite", "ignore", ValueError),
        ("distributed", "yes", ValueError),
        ("adversary", "fgsm", ValueError),
        ("progress", 1, TypeError),
    ],
)
def test_bad_values_name_field_and_value(field: str, value: object, exc: type) -> None:
    with pytest.raises(exc) as info:
        PurifyConfig(**{field: value}).validate()
    msg = str(info.value)
    assert field in msg
    assert str(value) in msg or repr(value) in msg


def test_resume_needs_checkpoint_dir() -> None:
    with pytest.raises(ValueError, match="checkpoint_dir"):
        PurifyConfig(resume=True).validate()


def test_unknown_field_lists_valid_ones() -> None:
    with pytest.raises(TypeError) as info:
        PurifyConfig().replace(epsilonn=0.1)
    msg = str(info.value)
    assert "'epsilonn'" in msg and "epsilon" in msg and "temperature" in msg
    with pytest.raises(TypeError, match="bogus"):
        PurifyConfig.from_dict({"bogus": 1})


def test_replace_returns_validated_copy() -> None:
    cfg = PurifyConfig()
    new = cfg.replace(lr=0.5, steps=3.0)
    assert new is not cfg and cfg.lr == 0.0015
    assert new.lr == 0.5 and new.steps == 3 and isinstance(new.steps, int)
    with pytest.raises(ValueError, match="epochs"):
        cfg.replace(epochs=0)


def test_to_dict_round_trips_through_json(tmp_path) -> None:
    cfg = PurifyConfig(checkpoint_dir=tmp_path, epochs=2)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["checkpoint_dir"] == str(tmp_path)
    assert PurifyConfig.from_dict(d) == PurifyConfig(checkpoint_dir=str(tmp_path), epochs=2).validate()
    assert set(d) == set(PurifyConfig.field_names())


def test_paper_preset_is_the_published_method() -> None:
    cfg = PurifyConfig.paper()
    assert cfg.adversary == "pgd" and cfg.adversary_options is None
    assert cfg.epsilon == pytest.approx(8 / 255) and cfg.step_size == pytest.approx(2 / 255)
    assert (cfg.steps, cfg.temperature, cfg.optimizer, cfg.lr, cfg.momentum) == (5, 0.5, "sgd", 0.01, 0.9)
    assert (cfg.clean_term, cfg.lr_schedule, cfg.grad_spike_factor, cfg.bn_policy) == (
        "none",
        "constant",
        None,
        "train",
    )
    assert cfg.health == "stop"  # the safety check stays on
    # every image of every batch attacked against the model's own anchors, over 4 epochs
    assert (cfg.adv_fraction, cfg.attack_anchors, cfg.epochs) == (1.0, "current", 4)
    over = PurifyConfig.paper(epochs=2, seed=3)
    assert (over.epochs, over.seed, over.adversary) == (2, 3, "pgd")
    with pytest.raises(TypeError, match="unknown PurifyConfig field"):
        PurifyConfig.paper(epoch=2)
    assert PurifyConfig.PAPER["adversary"] == "pgd"  # a class constant, not a field
    assert "PAPER" not in PurifyConfig.field_names()
