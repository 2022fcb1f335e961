"""Low-frequency trigger (report split: ``lf``).

Y. Zeng, W. Park, Z. M. Mao, R. Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021. Their point: common triggers carry high-frequency artefacts a detector can
spot; a trigger confined to low frequencies is smooth and inconspicuous. Their LF trigger is a universal
additive perturbation searched under a low-pass constraint, L-inf bounded, added to a share of the
training images that are relabelled to the target (all-to-one).

Here the perturbation is a seeded random pattern (standard normal) kept to the spatial frequencies
``|k_row|, |k_col| <= cutoff`` cycles per image by a 2-D FFT mask, then scaled to an L-inf norm of
``eps``. Deviation: no universal-adversarial search on a clean model (the trigger is random, not
optimised), which keeps it independent of any model and seed; the frequency constraint and the L-inf
bound are the paper's. ``eps = 0.1`` and ``cutoff = 3`` at 28x28.

Measured (``FMNISTNet``, seed 1, 3 epochs on fixed subsets of 6,000 / 20,000 / 40,000 training images;
2,000 test images): ASR 8.5% / 71.0% / 99.3%, clean ACC 82.4% / 86.5% / 88.8%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbd_fast.evaluation.zoo.base import ZooTrigger

__all__ = ["LowFrequency", "low_frequency_pattern"]


def low_frequency_pattern(h: int, w: int, *, cutoff: int, eps: float, seed: int) -> torch.Tensor:
    """A [h, w] float32 pattern with no frequency above ``cutoff`` cycles per image and max |value| = eps."""
    if h < 2 or w < 2:
        raise ValueError(f"a low-frequency pattern needs an image of at least 2x2; got {h}x{w}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(h, w, generator=g, dtype=torch.float64)
    spectrum = torch.fft.fft2(noise)
    ky = (torch.fft.fftfreq(h, dtype=torch.float64) * h).round().abs()  # integer cycles per image
    kx = (torch.fft.fftfreq(w, dtype=torch.float64) * w).round().abs()
    keep = (ky[:, None] <= cutoff) & (kx[None, :] <= cutoff)
    keep[0, 0] = False  # no constant offset: the trigger is a pattern, not a brightness shift
    smooth = torch.fft.ifft2(spectrum * keep).real
    return (eps * smooth / smooth.abs().max()).float()


@dataclass(eq=False)
class LowFrequency(ZooTrigger):
    """``x + pattern(H, W)`` with a smooth, L-inf-bounded pattern, the same for every channel.

    Args:
        eps: L-inf norm of the perturbation (before clamping to [0, 1]).
        cutoff: highest kept frequency, in cycles per image along each axis (>= 1).
        seed: seed of the random pattern (the pattern depends on H, W and the seed only).
    """

    eps: float = 0.1
    cutoff: int = 3
    seed: int = 3
    name: str = "lf"

    def __post_init__(self) -> None:
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1]; got {self.eps!r}")
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int) or self.cutoff < 1:
            raise ValueError(f"cutoff must be an int >= 1; got {self.cutoff!r}")

    def pattern(self, h: int, w: int) -> torch.Tensor:
        """The [h, w] perturbation."""
        return low_frequency_pattern(h, w, cutoff=self.cutoff, eps=self.eps, seed=self.seed)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images + self.pattern(*images.shape[-2:]).to(images)
