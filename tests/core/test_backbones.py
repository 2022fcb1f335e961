"""Backbone families (cbd_fast/core/backbones.py) through ``purify``: the automatic feature extractor
of timm, torchvision and Hugging Face transformers models, on small random-initialised models (no
downloads), and what ``purify`` does with outputs that are not one vector per image.

The tests of real timm / torchvision / transformers models skip with a reason where the package
does not import (torchvision needs torch 2.14.1 here: ``scripts/test_backbones.sh`` runs them in
that venv with ``CBD_FAST_REQUIRE_BACKBONES=1``, where a skip is a failure). The rest fake a family
with a class defined "in" the family's package (``__module__``), which is all the detection reads.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import pytest
import torch
from torch import nn

import cbd_fast
from cbd_fast.core import backbones
from cbd_fast.core.backbones import (
    ForwardFeatures,
    HeadInputFeatures,
    TransformersFeatures,
    auto_feature_fn,
    describe_features,
    detect_family,
    standardisation_hint,
)
from tests.app._optional import require_module

#: one quick epoch: the paper's PGD adversary with one step, few images
FAST = dict(epochs=1, steps=1, batch_size=16, adversary="pgd", health_images=16, progress=False, seed=0)


def _changed(before: dict[str, torch.Tensor], module: nn.Module, prefix: str = "") -> bool:
    return any(
        not torch.equal(before[k], v)
        for k, v in module.state_dict().items()
        if k.startswith(prefix) and k in before
    )


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------ fakes


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x))).flatten(1)


class FakeTorchvisionNet(_Conv):
    """A torchvision-style classifier: ``fc`` reads the pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


FakeTorchvisionNet.__module__ = "torchvision.models.fake"


class FakeTimmNet(_Conv):
    """A timm-style classifier: forward_features + forward_head(pre_logits=...)."""

    global_pool = "token"

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


FakeTimmNet.__module__ = "timm.models.fake"


class _Output(OrderedDict):
    """A stand-in for transformers' ModelOutput (an OrderedDict subclass)."""


_Output.__name__ = "BaseModelOutputWithPooling"


class FakeHFBase(nn.Module):
    def __init__(self, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.conv = nn.Conv2d(3, 6, 4, stride=4)

    def forward(self, pixel_values: torch.Tensor) -> _Output:
        fmap = self.conv(pixel_values)  # [B, 6, H/4, W/4]
        if self.tokens:  # a ViT: [B, T, D] with a "CLS" token first
            seq = fmap.flatten(2).transpose(1, 2)
            seq = torch.cat([seq.mean(1, keepdim=True), seq], dim=1)
            return _Output(last_hidden_state=seq, pooler_output=torch.tanh(seq[:, 0] * 3))
        return _Output(last_hidden_state=fmap, pooler_output=fmap.mean((2, 3), keepdim=True))


FakeHFBase.__module__ = "transformers.models.fake.modeling_fake"


class FakeHFClassifier(nn.Module):
    def __init__(self, tokens: bool = True) -> None:
        super().__init__()
        self.fake = FakeHFBase(tokens)
        self.classifier = nn.Linear(6, 3)

    @property
    def base_model(self) -> nn.Module:
        return self.fake

    def forward(self, pixel_values: torch.Tensor) -> _Output:
        return _Output(logits=self.classifier(self.fake(pixel_values)["last_hidden_state"][:, 0]))


FakeHFClassifier.__module__ = "transformers.models.fake.modeling_fake"


# ------------------------------------------------------------------------------------------ choice


def test_family_detection_reads_the_class_package():
    assert detect_family(FakeTimmNet()) == "timm"
    assert detect_family(FakeTorchvisionNet()) == "torchvision"
    assert detect_family(FakeHFClassifier()) == "transformers"
    assert detect_family(nn.Linear(2, 2)) is None
    assert auto_feature_fn(nn.Sequential(nn.Flatten())) is None
    assert describe_features(None, 16) == "the module's output, 16-d"
    assert describe_features(lambda m, x: m(x), 4).startswith("feature_fn ")
    assert backbones.FAMILIES == ("timm", "torchvision", "transformers")


def test_timm_style_forward_features_and_own_pooling():
    net = FakeTimmNet()
    fn = auto_feature_fn(net)
    assert isinstance(fn, ForwardFeatures) and fn.describe() == "timm forward_features + CLS token"
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(fn(net, x), net.forward_head(net.forward_features(x), pre_logits=True))


def test_torchvision_style_head_input_without_running_the_head():
    net = FakeTorchvisionNet()
    fn = auto_feature_fn(net)
    assert (
        isinstance(fn, HeadInputFeatures)
        and fn.describe() == "torchvision FakeTorchvisionNet: input of .fc (the classifier's input)"
    )
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    calls = []
    net.fc.register_forward_hook(lambda *a: calls.append(1))
    feats = fn(net, x)
    assert torch.allclose(feats, net.pooled(x)) and calls == []  # the classifier never ran
    assert not net.fc._forward_pre_hooks  # the capture hook is removed
    feats.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(("tokens", "source", "dim"), [(True, "CLS token", 6), (False, "pooler_output", 6)])
def test_transformers_style_cls_token_or_pooled_output(tokens, source, dim):
    net = FakeHFClassifier(tokens)
    fn = auto_feature_fn(net)
    assert isinstance(fn, TransformersFeatures)
    x = torch.rand(2, 3, 8, 8)
    feats = fn(net, x)
    assert feats.shape == (2, dim) and source in fn.describe()
    out = net.fake(x)
    want = out["last_hidden_state"][:, 0] if tokens else out["pooler_output"].flatten(1)
    assert torch.equal(feats, want)  # never the tanh pooler of a token model


def test_purify_picks_logs_once_and_feature_fn_overrides(caplog):
    x = torch.rand(32, 3, 8, 8)
    net = FakeTorchvisionNet()
    head = _state(net.fc)
    with caplog.at_level(logging.INFO, logger="cbd_fast"):
        res = cbd_fast.Purifier(**FAST).fit(net, x)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features:")]
    assert lines == ["features: torchvision FakeTorchvisionNet: input of .fc (the classifier's input), 8-d"]
    assert res.features == lines[0].removeprefix("features: ")
    assert _changed(_state(net), res.encoder, "conv")  # the backbone was purified
    assert all(torch.equal(head[k], v) for k, v in res.encoder.fc.state_dict().items())  # the head untouched
    res2 = cbd_fast.Purifier(**FAST).fit(net, x, feature_fn=lambda m, t: m(t))  # logits, on purpose
    assert res2.features.startswith("feature_fn ") and res2.features.endswith(", 5-d")
    assert res.runtime["device"] == "cpu" and res.runtime["amp_dtype"] == "float32"


# ------------------------------------------------------------------------------------------ bad outputs


class _Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor):
        f = self.conv(x)  # [B, 4, H, W]
        if self.kind == "tuple":
            return f.flatten(1), f
        if self.kind == "model_output":
            return _Output(last_hidden_state=f.flatten(2).transpose(1, 2), pooler_output=f.mean((2, 3)))
        if self.kind == "tokens":
            return f.flatten(2).transpose(1, 2)  # [B, T, D]
        if self.kind == "5d":
            return f.unsqueeze(1)
        return f  # "map": [B, C, H, W]


@pytest.mark.parametrize(
    ("kind", "error", "words"),
    [
        ("tuple", TypeError, ("the encoder returned tuple", "feature_fn")),
        (
            "model_output",
            TypeError,
            ("BaseModelOutputWithPooling", "last_hidden_state, pooler_output", "feature_fn"),
        ),
        ("tokens", ValueError, ("3-D tensor", "token sequence", "m(x)[:, 0]", "(4, 64, 4)")),
        ("5d", ValueError, ("[B, D] or a feature map [B, C, H, W]", "(4, 1, 4, 8, 8)")),
    ],
)
def test_outputs_that_are_not_one_vector_per_image_are_refused_before_training(kind, error, words):
    enc = _Returns(kind)
    before = _state(enc)
    with pytest.raises(error) as info:
        cbd_fast.purify(enc, torch.rand(8, 3, 8, 8), **{**FAST, "batch_size": 4})
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert not _changed(before, enc)


def test_feature_maps_are_flattened_and_pickable_with_feature_fn():
    res = cbd_fast.Purifier(**FAST).fit(_Returns("map"), torch.rand(32, 3, 8, 8))
    assert res.features == "the module's output, 256-d"  # [B, 4, 8, 8] -> [B, 256]
    res = cbd_fast.Purifier(**FAST).fit(
        _Returns("tokens"), torch.rand(32, 3, 8, 8), feature_fn=lambda m, x: m(x)[:, 0]
    )
    assert res.features.endswith(", 4-d")


# ------------------------------------------------------------------------------------------ real families


def _images(n: int = 32, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def _purify_and_check(model: nn.Module, want: str, head: str | None) -> cbd_fast.PurifyResult:
    before = _state(model)
    t0 = time.perf_counter()
    res = cbd_fast.Purifier(**FAST).fit(model, _images())
    secs = time.perf_counter() - t0
    print(f"\n{type(model).__name__}: {res.features}; {res.history[0]['seconds']:.1f} s/epoch ({secs:.1f} s)")
    assert res.features == want
    assert not _changed(before, model)  # the caller's model is not modified
    assert _changed(before, res.encoder)  # the copy was purified
    if head is not None:  # the classifier is not part of the features: left as it was
        assert all(
            torch.equal(before[k], v) for k, v in res.encoder.state_dict().items() if k.startswith(head)
        )
    assert all(torch.isfinite(torch.tensor(res.history[0][k])) for k in ("loss", "health_knn"))
    # the head term guides the fine-tuning exactly when the model's own head was found and verified
    assert (res.runtime["head_weight"] == 1.0) == (res.head is not None), (res.head, res.runtime)
    return res


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("test_resnet", "timm forward_features + avg pool, 96-d"),
        ("test_convnext", "timm forward_features + avg pool, 64-d"),
        ("test_vit", "timm forward_features + CLS token, 64-d"),
    ],
)
def test_timm_models(name, want):
    timm = require_module("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    hint = standardisation_hint(model)  # its pretrained_cfg declares a mean / std
    assert hint is not None and "input_mean=(" in hint and type(model).__name__ in hint
    res = _purify_and_check(model, want, head=None)
    fn = auto_feature_fn(res.encoder)
    x = _images(4)
    with torch.no_grad():
        want_feats = res.encoder.forward_head(res.encoder.forward_features(x), pre_logits=True)
        assert torch.allclose(fn(res.encoder, x), want_feats)


@pytest.mark.parametrize(
    ("name", "kwargs", "want", "head"),
    [
        ("resnet50", {}, "torchvision ResNet: input of .fc (global avg pool), 2048-d", "fc."),
        (
            "vit_b_16",
            {"image_size": 32},
            "torchvision VisionTransformer: input of .heads (CLS token), 768-d",
            "heads.",
        ),
    ],
)
def test_torchvision_models(name, kwargs, want, head):
    models = require_module("torchvision.models")
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=10, **kwargs).eval()
    _purify_and_check(model, want, head=head)


def _tiny_vit_config():
    transformers = require_module("transformers")
    return transformers, transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )


def test_transformers_vit_from_a_local_folder(tmp_path):
    transformers, config = _tiny_vit_config()
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    model = transformers.AutoModelForImageClassification.from_pretrained(
        tmp_path / "vit", trust_remote_code=False, local_files_only=True
    ).eval()
    _purify_and_check(
        model,
        "transformers ViTForImageClassification CLS token (last_hidden_state[:, 0]), 32-d",
        "classifier.",
    )
    base = transformers.ViTModel(config).eval()  # AutoModel-style: a pooler exists, the CLS token is used
    base.save_pretrained(tmp_path / "base")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "base", local_files_only=True).eval()
    _purify_and_check(loaded, "transformers ViTModel CLS token (last_hidden_state[:, 0]), 32-d", None)


# ------------------------------------------------------------------------------------------ heads


def _assert_head_reads_the_features(model: nn.Module) -> None:
    """The model's own head is found, verified, and predicts what the model predicts."""
    from cbd_fast.core.heads import resolve_head

    fn = auto_feature_fn(model)
    x = _images(6)
    head = resolve_head(None, model, fn, None, x, torch.no_grad)
    assert head is not None, type(model).__name__
    with torch.no_grad():
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        assert torch.equal(head.predict(fn(model, x).float()), logits.argmax(1))


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit"])
def test_timm_heads_are_found_and_verified(name):
    timm = require_module("timm")
    torch.manual_seed(0)
    _assert_head_reads_the_features(timm.create_model(name, pretrained=False, num_classes=10).eval())
    headless = timm.create_model(name, pretrained=False, num_classes=0).eval()
    from cbd_fast.core.heads import resolve_head

    assert resolve_head(None, headless, auto_feature_fn(headless), None, _images(4), torch.no_grad) is None


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet18", {}), ("mobilenet_v3_small", {}), ("convnext_tiny", {}), ("vit_b_16", {"image_size": 32})],
)
def test_torchvision_heads_are_found_and_verified(name, kwargs):
    models = require_module("torchvision.models")
    torch.manual_seed(0)
    _assert_head_reads_the_features(getattr(models, name)(num_classes=10, **kwargs).eval())


def test_transformers_heads_are_found_and_verified():
    transformers, config = _tiny_vit_config()
    torch.manual_seed(0)
    _assert_head_reads_the_features(transformers.ViTForImageClassification(config).eval())
    from cbd_fast.core.heads import resolve_head

    base = transformers.ViTModel(config).eval()  # no classifier: no head
    assert resolve_head(None, base, auto_feature_fn(base), None, _images(4), torch.no_grad) is None
