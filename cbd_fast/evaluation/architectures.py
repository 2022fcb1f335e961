"""Small Fashion-MNIST classifiers built the ordinary way, FOR EVALUATION ONLY: one per family.

``cbd_fast.purify`` must work on backbones its authors did not design. Each model here is a
``Classifier`` = ``backbone`` (images [B, 1, 28, 28] float32 in [0, 1] -> features [B, D] float32)
+ ``head`` (``nn.Linear(D, num_classes)``), built with the layers a user would pick from a textbook,
so the defense can be checked per architecture family (``scripts/stability_matrix.py``):

- ``bn_gap_cnn``: 5 conv layers with BatchNorm and ReLU, stride-2 downsampling, global average pooling
  (ResNet-shaped, no residuals); features are post-ReLU averages (non-negative).
- ``resnet8``: a 3x3 stem and three basic residual blocks (16, 32, 64 channels, BatchNorm), a 1x1
  conv + BatchNorm + ReLU to D (the MobileNetV2-style head conv), global average pooling.
- ``groupnorm_cnn``: ``bn_gap_cnn`` with GroupNorm (no running statistics at all).
- ``mlp``: flatten -> two hidden layers (256, ReLU) -> a linear layer to D (signed features).
- ``tiny_vit``: a ViT with 7x7 (or 4x4) patches, 2-4 pre-LayerNorm transformer blocks, CLS-token (or
  mean) pooling, a final LayerNorm and a bias-free linear projection to D (CLIP-style; no BatchNorm).
- ``fmnistnet``: the project's own ``FMNISTNet`` (max-pooling, final Linear + ReLU).
- ``resnet18`` and ``wide_vit``: the wide families, ResNet-18 with the ImageNet stem (64 to 512
  channels, fan-in up to 4608) and ``tiny_vit`` at width 256: backbones of the size users download,
  where one optimiser step moves each layer's outputs much further than in the 16-channel models.

``ARCHITECTURES[name](feature_dim=D)`` builds any of them for D from 16 to 2048 (any D >= 1 works).
``train_adam`` is the ordinary user's recipe (Adam, lr 1e-3, cross-entropy, no schedule), unlike the
project's ``backdoors.train_classifier`` (SGD one-cycle).

Sizes and costs at D = 128 (one thread, Adam, batches of 128; one epoch = 60,000 images): fmnistnet
0.10M parameters ~26 s/epoch, bn_gap_cnn 0.11M ~41 s, resnet8 0.09M ~97 s, groupnorm_cnn 0.11M ~30 s,
mlp 0.30M ~2 s, tiny_vit 0.11M ~18 s: a 3-epoch training on all 60,000 images takes 5 minutes at most;
resnet18 11.2M ~220 s and wide_vit 2.2M ~240 s per epoch (two processes side by side on 2 cores).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.fmnist import ImageSet
from cbd_fast.evaluation.models import FMNISTNet

__all__ = [
    "ARCHITECTURES",
    "Classifier",
    "bn_gap_cnn",
    "build",
    "fmnistnet",
    "groupnorm_cnn",
    "mlp",
    "resnet18",
    "resnet8",
    "tiny_vit",
    "train_adam",
    "wide_vit",
]

IMAGE_SHAPE = (1, 28, 28)


def _check_dim(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


class Classifier(nn.Module):
    """``head(backbone(x))``: images [B, 1, 28, 28] float in [0, 1] -> logits [B, num_classes].

    Args:
        backbone: images [B, 1, 28, 28] -> features [B, feature_dim].
        feature_dim: D, the width of the backbone's features.
        num_classes: outputs of the linear head.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(_check_dim("feature_dim", feature_dim), _check_dim("num_classes", num_classes))
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 28, 28] -> [B, D] backbone features."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 28, 28] -> [B, num_classes] logits."""
        return self.head(self.backbone(x))


# ------------------------------------------------------------------ convolutional families


def _groups(channels: int, most: int = 8) -> int:
    """The largest group count <= ``most`` that divides ``channels`` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, most + 1) if channels % g == 0)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_groups(channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group'; got {kind!r}")


def _conv_norm_relu(cin: int, cout: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        _norm(norm, cout),
        nn.ReLU(inplace=True),
    )


def _gap_cnn(feature_dim: int, width: int, norm: str) -> nn.Sequential:
    """5 conv layers, 28x28 -> 28, 14, 14, 7, 4, then global average pooling: [B, 1, 28, 28] -> [B, D]."""
    _check_dim("feature_dim", feature_dim)
    _check_dim("width", width)
    return nn.Sequential(
        _conv_norm_relu(1, width, 1, norm),  # 28x28
        _conv_norm_relu(width, 2 * width, 2, norm),  # 14x14
        _conv_norm_relu(2 * width, 2 * width, 1, norm),  # 14x14
        _conv_norm_relu(2 * width, 4 * width, 2, norm),  # 7x7
        _conv_norm_relu(4 * width, feature_dim, 2, norm),  # 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def bn_gap_cnn(feature_dim: int = 128, *, width: int = 16, num_classes: int = 10) -> Classifier:
    """5 conv layers (3x3, BatchNorm, ReLU; strides 1, 2, 1, 2, 2) + global average pooling.

    Channels ``width, 2w, 2w, 4w, D``; features [B, D] are means of ReLU outputs (>= 0). ~0.1M
    parameters at D = 128 (w = 16).
    """
    return Classifier(_gap_cnn(feature_dim, width, "batch"), feature_dim, num_classes)


def groupnorm_cnn(feature_dim: int = 128, *, width: int = 16, num_classes: int = 10) -> Classifier:
    """``bn_gap_cnn`` with GroupNorm (up to 8 groups, a divisor of the channels) instead of BatchNorm."""
    return Classifier(_gap_cnn(feature_dim, width, "group"), feature_dim, num_classes)


class BasicBlock(nn.Module):
    """The ResNet basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    [B, cin, H, W] -> [B, cout, ceil(H / stride), ceil(W / stride)]; the shortcut is a 1x1 strided
    conv + BatchNorm when the shape changes, the identity otherwise.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet8(feature_dim: int = 128, *, width: int = 16, num_classes: int = 10) -> Classifier:
    """ResNet-8: 3x3 stem (w channels), basic blocks w, 2w, 4w (strides 1, 2, 2), 1x1 conv to D, GAP.

    [B, 1, 28, 28] -> stem 28x28 -> blocks 28, 14, 7 -> 1x1 conv + BatchNorm + ReLU to D -> average
    pooling -> [B, D] (>= 0). ~0.09M parameters at D = 128 (w = 16).
    """
    _check_dim("feature_dim", feature_dim)
    _check_dim("width", width)
    backbone = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2),
        nn.Conv2d(4 * width, feature_dim, 1, bias=False),
        nn.BatchNorm2d(feature_dim),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Classifier(backbone, feature_dim, num_classes)


def resnet18(feature_dim: int = 128, *, width: int = 64, num_classes: int = 10) -> Classifier:
    """ResNet-18 with the ImageNet stem (He et al. 2016), as torchvision builds it, on 1-channel images.

    [B, 1, 28, 28] -> 7x7 stride-2 conv + BatchNorm + ReLU + 3x3 stride-2 max-pool (7x7) -> two
    basic blocks each of w, 2w, 4w, 8w channels (strides 1, 2, 2, 2: 7, 4, 2, 1) -> 1x1 conv +
    BatchNorm + ReLU to D -> average pooling -> [B, D] (>= 0). ~11.2M parameters at w = 64, D = 128:
    the wide family (fan-in up to 9 * 8w = 4608), where one optimiser step moves a layer's outputs
    far more than in the 16-channel models above.
    """
    _check_dim("feature_dim", feature_dim)
    _check_dim("width", width)
    layers: list[nn.Module] = [
        nn.Conv2d(1, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [
        nn.Conv2d(cin, feature_dim, 1, bias=False),
        nn.BatchNorm2d(feature_dim),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    return Classifier(nn.Sequential(*layers), feature_dim, num_classes)


def fmnistnet(feature_dim: int = 128, *, num_classes: int = 10) -> FMNISTNet:
    """The project's own ``FMNISTNet`` (3 conv + BatchNorm + max-pool blocks, Linear + ReLU to D)."""
    return FMNISTNet(num_classes=num_classes, feature_dim=_check_dim("feature_dim", feature_dim))


# ------------------------------------------------------------------ MLP


def mlp(feature_dim: int = 128, *, hidden: int = 256, num_classes: int = 10) -> Classifier:
    """Flatten -> Linear(784, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, D): [B, 1, 28, 28] -> [B, D].

    The features are the last linear layer's outputs (signed, no activation). ~0.3M parameters at
    D = 128 (h = 256).
    """
    _check_dim("feature_dim", feature_dim)
    _check_dim("hidden", hidden)
    backbone = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(IMAGE_SHAPE), hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, feature_dim),
    )
    return Classifier(backbone, feature_dim, num_classes)


# ------------------------------------------------------------------ vision transformer


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``; [B, T, E] -> [B, T, E].

    Args:
        dim: token width E (divisible by ``heads``).
        heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of E (GELU).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads; got dim={dim}, heads={heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        hidden = max(1, round(mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention, [B, T, E] -> [B, T, E]."""
        b, t, e = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // self.heads), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """A small ViT backbone: [B, 1, 28, 28] float in [0, 1] -> [B, D] features (no BatchNorm anywhere).

    Patch embedding (a conv with kernel = stride = ``patch``: (28 / patch)^2 tokens of width E),
    learned position embeddings, ``depth`` pre-LN transformer blocks, pooling (the CLS token or the
    mean of the patch tokens), a final LayerNorm and a bias-free linear projection E -> D.

    Args:
        feature_dim: D.
        patch: 4 or 7 (any divisor of 28 works).
        depth: transformer blocks (2 to 4 in the matrix).
        dim: token width E.
        heads: attention heads.
        pool: ``"cls"`` or ``"mean"``.
    """

    def __init__(
        self,
        feature_dim: int = 128,
        *,
        patch: int = 7,
        depth: int = 3,
        dim: int = 64,
        heads: int = 4,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        _check_dim("feature_dim", feature_dim)
        _check_dim("depth", depth)
        if not isinstance(patch, int) or patch < 1 or IMAGE_SHAPE[1] % patch:
            raise ValueError(f"patch must divide {IMAGE_SHAPE[1]}; got {patch!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean'; got {pool!r}")
        self.pool = pool
        tokens = (IMAGE_SHAPE[1] // patch) ** 2
        self.embed = nn.Conv2d(IMAGE_SHAPE[0], dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, feature_dim, bias=False)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 28, 28] -> [B, D]."""
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, T, E]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        tokens = self.blocks(tokens)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(1)
        return self.proj(self.ln(pooled))


def tiny_vit(
    feature_dim: int = 128,
    *,
    patch: int = 7,
    depth: int = 3,
    dim: int = 64,
    heads: int = 4,
    pool: str = "cls",
    num_classes: int = 10,
) -> Classifier:
    """``TinyViT`` backbone + linear head. ~0.1M parameters at the defaults (16 tokens of width 64)."""
    backbone = TinyViT(feature_dim, patch=patch, depth=depth, dim=dim, heads=heads, pool=pool)
    return Classifier(backbone, feature_dim, num_classes)


def wide_vit(feature_dim: int = 128, *, num_classes: int = 10) -> Classifier:
    """``tiny_vit`` at four times the width: 7x7 patches, 4 pre-LayerNorm blocks of width 256 (4
    heads of 64, the ViT-S head size), CLS pooling. ~2.2M parameters: the wide transformer family
    (fan-in up to 1024 in the MLP), where Adam fine-tuning is usually run at smaller steps."""
    return tiny_vit(feature_dim, dim=256, depth=4, heads=4, num_classes=num_classes)


#: name -> factory(feature_dim=D) -> a module with ``.backbone`` ([B, 1, 28, 28] -> [B, D]) and ``.head``.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fmnistnet": fmnistnet,
    "bn_gap_cnn": bn_gap_cnn,
    "resnet8": resnet8,
    "groupnorm_cnn": groupnorm_cnn,
    "mlp": mlp,
    "tiny_vit": tiny_vit,
    "resnet18": resnet18,
    "wide_vit": wide_vit,
}


def build(name: str, feature_dim: int = 128, **kwargs: object) -> nn.Module:
    """The architecture called ``name`` (one of ``ARCHITECTURES``) with ``feature_dim`` D."""
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}; got {name!r}")
    return ARCHITECTURES[name](feature_dim=feature_dim, **kwargs)


# ------------------------------------------------------------------ the ordinary user's training


def train_adam(
    model: nn.Module,
    data: ImageSet,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Cross-entropy training with Adam at a constant ``lr``, in place; returns ``model`` in eval mode.

    Args:
        model: a classifier images [B, C, H, W] -> logits [B, K].
        data: the (possibly poisoned) training set: images [N, C, H, W] float32, labels [N] int64.
        epochs, lr, batch_size: optimisation (defaults: the ordinary recipe, 3 epochs of Adam 1e-3).
        seed: seed of the shuffling (initialise the model with ``torch.manual_seed`` before building).
        log: optional ``log(line)`` called once per epoch with the mean loss and the seconds.

    Raises:
        RuntimeError: the loss became non-finite (names the epoch and batch).
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        _check_dim(name, value)
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        t0, total, perm = time.perf_counter(), 0.0, torch.randperm(len(data), generator=g)
        for i, start in enumerate(range(0, len(data), batch_size)):
            b = perm[start : start + batch_size]
            loss = F.cross_entropy(model(data.images[b]), data.labels[b])
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"non-finite training loss {loss.item()} at epoch {epoch + 1}, batch {i + 1}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        if log is not None:
            log(
                f"epoch {epoch + 1}/{epochs}: loss {total / len(data):.4f} ({time.perf_counter() - t0:.0f} s)"
            )
    return model.eval()
