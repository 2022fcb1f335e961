"""BppAttack: colour-depth squeezing with dithering as the trigger (report split: ``bpp``).

Z. Wang, J. Zhai, S. Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks
via Image Quantization and Contrastive Adversarial Learning", CVPR 2022. Recipe: the trigger squeezes
every pixel to ``2**bits`` levels with Floyd-Steinberg error diffusion (so the image looks the same but
carries the quantisation texture); a share of the training images get it and the target label.

Settings: ``bits = 3`` (8 grey levels; the paper uses 5 bits on CIFAR-10's 3 colour channels: one
grayscale channel has less room, so fewer bits make the texture learnable in 3 epochs). Deviation: the
paper's contrastive adversarial training (extra negative samples) is not used: plain poisoned training.

Measured (``FMNISTNet``, seed 1, 3 epochs on fixed subsets of 6,000 / 20,000 / 40,000 training images;
2,000 test images): 3 bits ASR 9.9% / 48.9% / 73.3% (still rising with the number of steps; the full
60,000-image run was not measured), clean ACC 81.5% / 84.4% / 88.0%; 2 bits on 20,000 images: ASR
93.2%. If the full run leaves ASR low, ``settings={"bits": 2}`` is the stronger variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbd_fast.evaluation.zoo.base import ZooTrigger

__all__ = ["BitDepthSqueeze", "floyd_steinberg"]


def floyd_steinberg(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantise [N, C, H, W] values in [0, 1] to ``levels`` evenly spaced values with error diffusion.

    Floyd-Steinberg, left to right and top to bottom: the error of each pixel goes 7/16 right, 3/16
    down-left, 5/16 down, 1/16 down-right. Vectorised over N and C (a loop over the H*W pixels).

    Returns:
        A new tensor of the same shape and dtype whose values are multiples of 1 / (levels - 1).
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2; got {levels!r}")
    buf = images.to(torch.float64).clone()
    h, w = buf.shape[-2:]
    step = levels - 1
    for i in range(h):
        for j in range(w):
            old = buf[..., i, j]
            new = torch.round(old.clamp(0.0, 1.0) * step) / step
            err = old - new
            buf[..., i, j] = new
            if j + 1 < w:
                buf[..., i, j + 1] += err * (7.0 / 16.0)
            if i + 1 < h:
                if j > 0:
                    buf[..., i + 1, j - 1] += err * (3.0 / 16.0)
                buf[..., i + 1, j] += err * (5.0 / 16.0)
                if j + 1 < w:
                    buf[..., i + 1, j + 1] += err * (1.0 / 16.0)
    return buf.to(images.dtype)


@dataclass(eq=False)
class BitDepthSqueeze(ZooTrigger):
    """Squeeze to ``bits`` bits per channel with Floyd-Steinberg dithering; any [N, C, H, W].

    Args:
        bits: 1 to 7 (2**bits grey levels per channel).
    """

    bits: int = 3
    name: str = "bpp"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 7:
            raise ValueError(f"bits must be an int in [1, 7]; got {self.bits!r}")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return floyd_steinberg(images, 2**self.bits)
