"""Local patch triggers (BadNets variants) and the patterns they stamp.

BadNets: T. Gu, B. Dolan-Gavitt, S. Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
Model Supply Chain", arXiv:1708.06733, 2017 (IEEE Access 2019). Recipe: stamp a small fixed pattern at a
fixed position on a share of the training images and relabel them to the target class (all-to-one).
The dev split's ``badnets`` is the 3x3 white bottom-right square of ``backdoors.BadNets``; the report
split varies pattern, size and position:

- ``badnets_checker``: a 4x4 black/white checkerboard at rows 1-4, columns 1-4 (top-left area, one
  pixel in from the border; the whole 4x4 square is written, black cells included);
- ``badnets_random``: a 5x5 fixed random binary pattern (seed 5, both values present) at rows 4-8,
  columns 18-22 (upper right of the garment, not a corner).

Measured (``FMNISTNet``, seed 1, 3 epochs on a fixed 6,000-image subset, 2,000 test images):
``badnets_checker`` ASR 99.9% / clean ACC 83.2%, ``badnets_random`` 100% / 83.4%.

``CornerPatterns`` is the four-corner trigger of the label-consistent attack (``clean_label.py``);
``plus_pattern`` is the trigger of ``badencoder_simclr`` (``encoder.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cbd_fast.evaluation.zoo.base import ZooTrigger, check_pattern, pattern_for

__all__ = [
    "CornerPatterns",
    "PatchTrigger",
    "checkerboard",
    "plus_pattern",
    "random_binary",
]


def checkerboard(size: int, *, first: float = 1.0) -> torch.Tensor:
    """A [size, size] float32 checkerboard of 0 and 1 whose top-left cell is ``first``."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int; got {size!r}")
    i = torch.arange(size)
    board = ((i[:, None] + i[None, :]) % 2 == 0).float()
    return board if first == 1.0 else 1.0 - board


def random_binary(size: int, *, seed: int) -> torch.Tensor:
    """A [size, size] float32 fixed random pattern of 0 and 1 (redrawn from ``seed`` until both occur)."""
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an int >= 2; got {size!r}")
    g = torch.Generator().manual_seed(seed)
    while True:
        p = (torch.rand(size, size, generator=g) < 0.5).float()
        if 0 < float(p.sum()) < size * size:
            return p


def plus_pattern(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pattern, mask)``: a white "+" of odd ``size`` (both [size, size] float32; the mask is the +)."""
    if not isinstance(size, int) or size < 3 or size % 2 == 0:
        raise ValueError(f"size must be an odd int >= 3; got {size!r}")
    mask = torch.zeros(size, size)
    mask[size // 2, :] = 1.0
    mask[:, size // 2] = 1.0
    return mask.clone(), mask


@dataclass(eq=False)
class PatchTrigger(ZooTrigger):
    """Stamp a fixed pattern at a fixed position: ``x + amplitude * mask * (pattern - x)`` there.

    Args:
        pattern: [h, w] or [c, h, w] float in [0, 1] (c = 1 is used for every channel).
        top, left: position of the pattern's top-left pixel (>= 0); the patch must fit the image.
        mask: optional [h, w] weights in [0, 1] (which pixels of the patch are written; default all).
        amplitude: 1 writes the pattern exactly; less moves the pixels only part of the way.
        name: the attack name reported by the trigger.

    Raises (on call):
        ValueError: the patch does not fit [N, C, H, W] images (the message names both shapes).
    """

    pattern: torch.Tensor = field(default_factory=lambda: checkerboard(4))
    top: int = 1
    left: int = 1
    mask: torch.Tensor | None = None
    amplitude: float = 1.0
    name: str = "patch"

    def __post_init__(self) -> None:
        check_pattern(self.pattern)
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.pattern.shape[-2:]):
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} must be the pattern's [h, w] "
                f"{tuple(self.pattern.shape[-2:])}"
            )
        for what, v in (("top", self.top), ("left", self.left)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{what} must be an int >= 0; got {v!r}")
        if not 0.0 < self.amplitude <= 1.0:
            raise ValueError(f"amplitude must be in (0, 1]; got {self.amplitude!r}")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.pattern.shape[-2:]
        H, W = images.shape[-2:]
        if self.top + h > H or self.left + w > W:
            raise ValueError(
                f"{self.name}: a {h}x{w} patch at (row {self.top}, col {self.left}) does not fit images of "
                f"shape {tuple(images.shape)}"
            )
        p = pattern_for(self.pattern, images, self.name)
        m = self.amplitude * (torch.ones(h, w) if self.mask is None else self.mask).to(images)
        out = images.clone()
        region = out[..., self.top : self.top + h, self.left : self.left + w]
        out[..., self.top : self.top + h, self.left : self.left + w] = region + m * (p - region)
        return out

    def config(self) -> dict[str, Any]:
        return {"top": self.top, "left": self.left, "amplitude": self.amplitude, "name": self.name}

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"pattern": self.pattern.detach().clone()}
        if self.mask is not None:
            sd["mask"] = self.mask.detach().clone()
        return sd

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> PatchTrigger:
        return cls(pattern=state["pattern"].float(), mask=state.get("mask"), **config)


@dataclass(eq=False)
class CornerPatterns(ZooTrigger):
    """A pattern in all four corners (Turner et al. 2019), mirrored so the trigger is flip-symmetric.

    Each pixel of the pattern moves the image by ``amplitude`` towards its value: white cells add
    ``amplitude``, black cells subtract it (clamped to [0, 1]); ``amplitude = 1`` writes the pattern
    exactly (the test-time trigger), a smaller one is the paper's reduced-amplitude training trigger.

    Args:
        pattern: [s, s] float in {0, 1} (bottom-right orientation; mirrored into the other corners).
        margin: pixels between each pattern and the image border.
        amplitude: in (0, 1].

    Raises (on call):
        ValueError: the four patterns do not fit the image (the message names the shape).
    """

    pattern: torch.Tensor = field(default_factory=lambda: checkerboard(3))
    margin: int = 1
    amplitude: float = 1.0
    name: str = "four_corners"

    def __post_init__(self) -> None:
        if self.pattern.dim() != 2:
            raise ValueError(f"pattern must be [s, s]; got shape {tuple(self.pattern.shape)}")
        if not 0.0 < self.amplitude <= 1.0:
            raise ValueError(f"amplitude must be in (0, 1]; got {self.amplitude!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin must be an int >= 0; got {self.margin!r}")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        s_h, s_w = self.pattern.shape
        H, W = images.shape[-2:]
        if 2 * (self.margin + s_h) > H or 2 * (self.margin + s_w) > W:
            raise ValueError(
                f"{self.name}: four {s_h}x{s_w} patterns {self.margin} px from the border do not fit "
                f"images of shape {tuple(images.shape)}"
            )
        out = images.clone()
        m = self.margin
        rows = {"top": slice(m, m + s_h), "bottom": slice(H - m - s_h, H - m)}
        cols = {"left": slice(m, m + s_w), "right": slice(W - m - s_w, W - m)}
        for rname, r in rows.items():
            for cname, c in cols.items():
                p = self.pattern
                if rname == "top":
                    p = p.flip(0)
                if cname == "left":
                    p = p.flip(1)
                signed = (2.0 * p - 1.0).to(images)
                out[..., r, c] = out[..., r, c] + self.amplitude * signed
        return out
