"""cbd_fast.evaluation.architectures: every family builds for D in (16, 128, 2048), shapes are right,
the backbone/head split composes to the classifier, bad arguments are refused, the Adam trainer runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbd_fast.evaluation.architectures import (
    ARCHITECTURES,
    TinyViT,
    build,
    groupnorm_cnn,
    resnet8,
    tiny_vit,
    train_adam,
)
from cbd_fast.evaluation.fmnist import ImageSet

DIMS = (16, 128, 2048)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_registry_lists_every_family():
    assert set(ARCHITECTURES) == {
        "fmnistnet",
        "bn_gap_cnn",
        "resnet8",
        "groupnorm_cnn",
        "mlp",
        "tiny_vit",
        "resnet18",
        "wide_vit",
    }


def test_wide_families_are_wide():
    """The point of ``resnet18`` and ``wide_vit``: fan-ins far above the 16-channel families'."""
    from cbd_fast.evaluation.architectures import build

    def widest_fan_in(name: str) -> int:
        return max(p[0].numel() for p in build(name).backbone.parameters() if p.ndim >= 2)

    assert widest_fan_in("resnet18") == 9 * 512 and widest_fan_in("wide_vit") >= 1024
    assert max(widest_fan_in(n) for n in ("bn_gap_cnn", "resnet8", "groupnorm_cnn")) <= 9 * 64


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shapes_and_split(name: str, dim: int, images: torch.Tensor):
    model = ARCHITECTURES[name](feature_dim=dim).eval()
    assert isinstance(model.backbone, nn.Module) and isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (dim, 10)
    with torch.no_grad():
        z = model.backbone(images)
        logits = model(images)
    assert z.shape == (3, dim) and z.dtype == torch.float32
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(model.head(z), logits)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_backbone_is_differentiable_in_the_input(name: str, images: torch.Tensor):
    """purify's PGD needs d features / d images; train mode with a batch of 3 must work too."""
    model = ARCHITECTURES[name](feature_dim=16)
    x = images.clone().requires_grad_(True)
    model.backbone(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_families_use_the_norm_layers_they_claim():
    def kinds(m: nn.Module) -> set[type]:
        return {type(x) for x in m.modules()}

    assert nn.BatchNorm2d in kinds(build("bn_gap_cnn")) and nn.BatchNorm2d in kinds(resnet8())
    assert nn.GroupNorm in kinds(groupnorm_cnn()) and nn.BatchNorm2d not in kinds(groupnorm_cnn())
    vit = kinds(tiny_vit())
    assert nn.LayerNorm in vit and not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in vit)
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds(build("mlp")))


@pytest.mark.parametrize("patch,depth,pool", [(4, 2, "mean"), (7, 4, "cls")])
def test_tiny_vit_options(patch: int, depth: int, pool: str, images: torch.Tensor):
    vit = TinyViT(32, patch=patch, depth=depth, pool=pool).eval()
    assert vit.pos.shape == (1, (28 // patch) ** 2 + 1, 64)
    assert len(vit.blocks) == depth
    assert vit(images).shape == (3, 32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: build("vgg"), "vgg"),
        (lambda: build("mlp", 0), "feature_dim"),
        (lambda: build("bn_gap_cnn", 2.5), "feature_dim"),
        (lambda: TinyViT(16, patch=5), "patch"),
        (lambda: TinyViT(16, pool="max"), "max"),
        (lambda: TinyViT(16, dim=30, heads=4), "heads"),
    ],
)
def test_bad_arguments_name_the_value(call, match: str):
    with pytest.raises(ValueError, match=match):
        call()


def test_train_adam_learns_a_tiny_set():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > x.mean()).long()  # a separable two-class problem
    torch.manual_seed(0)
    model = build("mlp", 16)
    lines: list[str] = []
    train_adam(model, ImageSet(x, y), epochs=15, batch_size=32, seed=0, log=lines.append)
    assert not model.training and len(lines) == 15
    assert (model(x).argmax(1) == y).float().mean() > 0.8
    with pytest.raises(ValueError, match="lr"):
        train_adam(model, ImageSet(x, y), lr=0.0)
