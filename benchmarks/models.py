"""Encoders for the end-to-end benchmarks: architecture definitions only, random weights, no downloads.

Each encoder maps images in [0, 1] to unnormalised feature vectors (no classification head):

==============  ===============  =========  ======================================================
name            input            features   definition
==============  ===============  =========  ======================================================
``fmnist_cnn``  [N, 1, 28, 28]   128        ``cbd_fast.evaluation.models.make_backbone`` (the demo's backbone)
``resnet18``    [N, 3, 32, 32]   512        CIFAR-style ResNet-18 (3x3 stem, no max-pool)
``resnet50``    [N, 3, 224, 224] 2048       ImageNet ResNet-50 (torchvision's when importable)
``vit_b16``     [N, 3, 224, 224] 768        ViT-B/16, class token (timm's / torchvision's when
                                            importable)
==============  ===============  =========  ======================================================

The plain-torch definitions here follow the published architectures (He et al. 2016; Dosovitskiy et
al. 2021); ``prefer_library=True`` (the default on CUDA) swaps in torchvision/timm's implementation of
the same architecture when one is importable, so GPU numbers are measured on the models people use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EncoderSpec", "ENCODERS", "build_encoder", "BasicBlock", "Bottleneck", "ResNet", "ViT"]


# ----------------------------------------------------------------------------------------------------
# ResNet (He et al., "Deep Residual Learning for Image Recognition", 2016)
# ----------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; ``expansion`` = 1."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand; ``expansion`` = 4."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """A ResNet trunk ending in global average pooling (the encoder: no fc head).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
        in_channels: image channels.
        small_input: True for 32x32 images (3x3 stride-1 stem, no max-pool, the CIFAR variant);
            False for ImageNet-size images (7x7 stride-2 stem + 3x3 stride-2 max-pool).

    Shapes: [N, in_channels, H, W] float -> [N, 512 * block.expansion] float.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int = 3,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if small_input:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        stages = []
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, width, stride))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)


# ----------------------------------------------------------------------------------------------------
# ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021): pre-norm encoder, class token
# ----------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer encoder returning the final class-token embedding (no head).

    Args:
        image_size: H = W of the input images.
        patch: patch side (16 for ViT-B/16).
        dim: embedding width (768 for ViT-B).
        depth: transformer blocks (12 for ViT-B).
        heads: attention heads (12 for ViT-B).
        mlp_ratio: MLP hidden width over ``dim`` (4 for ViT-B).
        in_channels: image channels.

    Shapes: [N, in_channels, image_size, image_size] float -> [N, dim] float.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size must be a multiple of patch={patch}; got {image_size}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image_size // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    """One benchmark encoder.

    Attributes:
        name: registry key.
        input_shape: (C, H, W) of one image.
        feature_dim: width of the output features.
        build: ``build(prefer_library) -> nn.Module`` with random weights.
    """

    name: str
    input_shape: tuple[int, int, int]
    feature_dim: int
    build: Callable[[bool], nn.Module]


def _fmnist_cnn(prefer_library: bool) -> nn.Module:
    try:
        from cbd_fast.evaluation.models import make_backbone
    except ImportError:  # cbd_fast.evaluation is not importable: an architecture-compatible copy
        return _fmnist_cnn_fallback()
    return make_backbone()


def _fmnist_cnn_fallback(width: int = 16, feature_dim: int = 128) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        block(1, width),
        block(width, 2 * width),
        block(2 * width, 4 * width),
        nn.Flatten(),
        nn.Linear(4 * width * 9, feature_dim),
        nn.ReLU(),
    )


def _resnet18(prefer_library: bool) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), small_input=True)


def _resnet50(prefer_library: bool) -> nn.Module:
    if prefer_library:
        try:
            import torchvision

            model = torchvision.models.resnet50(weights=None)
            model.fc = nn.Identity()
            return model
        except Exception:  # noqa: BLE001 - any import/construct failure falls back to the plain definition
            pass
    return ResNet(Bottleneck, (3, 4, 6, 3), small_input=False)


def _vit_b16(prefer_library: bool) -> nn.Module:
    if prefer_library:
        try:
            import timm

            return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        except Exception:  # noqa: BLE001
            pass
    return ViT()


ENCODERS: dict[str, EncoderSpec] = {
    "fmnist_cnn": EncoderSpec("fmnist_cnn", (1, 28, 28), 128, _fmnist_cnn),
    "resnet18": EncoderSpec("resnet18", (3, 32, 32), 512, _resnet18),
    "resnet50": EncoderSpec("resnet50", (3, 224, 224), 2048, _resnet50),
    "vit_b16": EncoderSpec("vit_b16", (3, 224, 224), 768, _vit_b16),
}


def build_encoder(name: str, *, seed: int = 0, prefer_library: bool | None = None) -> nn.Module:
    """A freshly initialised encoder (random weights from ``seed``), on the CPU, in train mode.

    Args:
        name: one of ``ENCODERS`` ("fmnist_cnn", "resnet18", "resnet50", "vit_b16").
        seed: seeds ``torch.manual_seed`` before construction, so equal seeds give equal weights
            (for one implementation: the library and plain definitions differ).
        prefer_library: use torchvision/timm when importable (ResNet-50, ViT-B/16); None means
            "when CUDA is available".

    Returns:
        ``nn.Module`` mapping [N, *ENCODERS[name].input_shape] float images to [N, feature_dim].
    """
    if name not in ENCODERS:
        raise ValueError(f"name must be one of {sorted(ENCODERS)}; got {name!r}")
    if prefer_library is None:
        prefer_library = torch.cuda.is_available()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = ENCODERS[name].build(prefer_library)
    finally:
        torch.random.set_rng_state(state)
    return model.train()
