"""A colour/tone filter as the trigger (report split: ``filter``).

Filter triggers: Y. Liu, W.-C. Lee, G. Tao, S. Ma, Y. Aafer, X. Zhang, "ABS: Scanning Neural Networks
for Back-doors by Artificial Brain Stimulation", ACM CCS 2019, evaluates feature-space triggers made of
Instagram-style image filters (global transforms such as Nashville or Gotham: tone curves, faded
blacks, vignettes) applied to a share of the training images relabelled to the target.

For grayscale the filter is a "faded film" look: a gamma tone curve with lifted blacks and lowered
whites, ``lift + (gain - lift) * x**gamma``, times a radial vignette ``1 - vignette * r**2`` (r = 1
at the corners). Global: every pixel changes, the black background included. Settings: ``gamma = 0.7,
lift = 0.12, gain = 0.95, vignette = 0.35``. For C > 1 channels the same curve applies to each channel.

Measured (``FMNISTNet``, seed 1, 3 epochs on a fixed 6,000-image subset, 2,000 test images): ASR 99.2%,
clean ACC 82.7%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbd_fast.evaluation.zoo.base import ZooTrigger

__all__ = ["ToneFilter"]


@dataclass(eq=False)
class ToneFilter(ZooTrigger):
    """``(lift + (gain - lift) * x**gamma) * (1 - vignette * r**2)``; any [N, C, H, W].

    Args:
        gamma: tone-curve exponent (> 0; < 1 brightens the mid-tones).
        lift: output of black (faded blacks), in [0, 1).
        gain: output of white, in (lift, 1].
        vignette: darkening at the corners, in [0, 1).
    """

    gamma: float = 0.7
    lift: float = 0.12
    gain: float = 0.95
    vignette: float = 0.35
    name: str = "filter"

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0; got {self.gamma!r}")
        if not 0.0 <= self.lift < self.gain <= 1.0:
            raise ValueError(f"need 0 <= lift < gain <= 1; got lift={self.lift!r}, gain={self.gain!r}")
        if not 0.0 <= self.vignette < 1.0:
            raise ValueError(f"vignette must be in [0, 1); got {self.vignette!r}")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        ys = torch.linspace(-1.0, 1.0, h, dtype=images.dtype, device=images.device)
        xs = torch.linspace(-1.0, 1.0, w, dtype=images.dtype, device=images.device)
        r2 = (ys[:, None] ** 2 + xs[None, :] ** 2) / 2.0
        toned = self.lift + (self.gain - self.lift) * images.clamp(0.0, 1.0) ** self.gamma
        return toned * (1.0 - self.vignette * r2)
