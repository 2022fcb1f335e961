"""The small Fashion-MNIST CNN used by the demo, the evaluation and the tests.

``FMNISTNet`` = ``backbone`` (the feature extractor a user would download: images -> 128-d
unnormalised features) + ``head`` (a linear classifier). ``features(x)`` runs the backbone alone;
this split is what ``cbd_fast.purify`` purifies while the original head is kept for evaluation.
~0.1M parameters: one epoch over the 60,000 training images takes ~15 s on one CPU core.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["FMNISTNet", "make_backbone", "FEATURE_DIM", "ASSETS", "asset_path"]

#: Width of the backbone's output features.
FEATURE_DIM = 128


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def make_backbone(width: int = 16, feature_dim: int = FEATURE_DIM) -> nn.Sequential:
    """The feature extractor: [N, 1, 28, 28] float in [0, 1] -> [N, feature_dim] float (ReLU'd).

    Args:
        width: channels of the first conv block (doubled in each of the next two).
        feature_dim: output feature width.
    """
    if width <= 0 or feature_dim <= 0:
        raise ValueError(f"width and feature_dim must be > 0; got {width}, {feature_dim}")
    return nn.Sequential(
        _block(1, width),  # 28 -> 14
        _block(width, 2 * width),  # 14 -> 7
        _block(2 * width, 4 * width),  # 7 -> 3
        nn.Flatten(),
        nn.Linear(4 * width * 9, feature_dim),
        nn.ReLU(inplace=True),
    )


class FMNISTNet(nn.Module):
    """Backbone + linear head for 28x28 grayscale images.

    Args:
        num_classes: outputs of the head.
        width: channels of the first conv block.
        feature_dim: width of the backbone's features.

    Example:
        >>> net = FMNISTNet()
        >>> net(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.backbone = make_backbone(width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 28, 28] -> [N, feature_dim] backbone features (unnormalised)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 28, 28] -> [N, num_classes] logits."""
        return self.head(self.backbone(x))


def save_model(model: nn.Module, path: str) -> None:
    """Save ``model``'s state_dict with float tensors stored as float16 (half the size, ~200 KB).

    Measured on the shipped BadNets/Blended models: test ACC moves by at most 0.03 points (1-3 of
    10,000 images), ASR is unchanged.
    """
    import os

    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(sd, tmp)
    os.replace(tmp, path)


def load_model(path: str) -> FMNISTNet:
    """Load an ``FMNISTNet`` saved by ``save_model`` (float32, eval mode).

    Read with ``cbd_fast.core.safe_load.torch_load_weights`` (zip and pickle checks, then
    ``torch.load(weights_only=True)``): a cached or shipped file never runs code.

    Args:
        path: the state_dict file.

    Raises:
        ValueError: the file was refused or is not a state_dict (the message names it and says why).
    """
    from cbd_fast.core.safe_load import UnsafeFileError, torch_load_weights

    try:
        sd = torch_load_weights(path)
    except UnsafeFileError as exc:
        raise ValueError(f"cannot load FMNISTNet weights {str(path)!r}: {exc}") from exc
    if not isinstance(sd, dict):
        raise ValueError(f"{str(path)!r} does not hold a state_dict; got a {type(sd).__name__}")
    model = FMNISTNet()
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()})
    return model.eval()


#: the backdoored ``FMNISTNet`` models shipped with the package (trained by scripts/train_backdoor.py)
ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(attack: str, seed: int = 0) -> Path:
    """Path of the shipped backdoored model for ``attack`` and ``seed`` (may not exist)."""
    return ASSETS / f"{attack}_seed{seed}.pt"
