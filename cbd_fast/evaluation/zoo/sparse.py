"""Two sparse, high-amplitude DEV triggers that no square at a fixed place describes.

The report split's hardest misses are sparse triggers of full amplitude that the mask scan does not
find: an optimised patch (``trojannn``) and per-image masks (``input_aware``). The original five dev
attacks have no trigger of that kind, so nothing could be tuned for it without looking at report
numbers. These two dev attacks are of that kind and are not any report attack:

- ``pixels``: ``count`` isolated white pixels at fixed random positions (seed ``position_seed``),
  at least ``margin`` pixels from the border: BadNets' pixel backdoor (Gu et al. 2017, a single
  bright pixel on MNIST) spread over the image. No k x k square covers more than a few of them.
- ``random_location``: a fixed random binary ``size`` x ``size`` pattern pasted at a different
  position in every image: the "Random Backdoor" of Salem, Wen, Backes, Ma, Zhang, "Dynamic
  Backdoor Attacks Against Machine Learning Models", IEEE EuroS&P 2022 (their triggers are drawn at
  a random location per input; here the pattern is fixed and the location varies). One universal
  mask cannot represent it.

A position in ``random_location`` is a pure function of the image's content (a fixed random linear
hash of its 8-bit pixel values), so the same image gets the same trigger in every batch and process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cbd_fast.evaluation.zoo.base import ZooTrigger, check_pattern, pattern_for
from cbd_fast.evaluation.zoo.patches import random_binary

__all__ = ["RandomLocationPatch", "ScatteredPixels"]

#: the seed of the content hash's weights (``RandomLocationPatch``)
_HASH_SEED = 7919


@dataclass(eq=False)
class ScatteredPixels(ZooTrigger):
    """Set ``count`` fixed pixels (all channels) to ``value``.

    Args:
        count: how many pixels (>= 1).
        position_seed: the seed of their positions (drawn without replacement).
        margin: pixels kept clear of the border (>= 0).
        value: the value written, in [0, 1].

    Raises (on call):
        ValueError: the image is too small for ``count`` pixels inside the margin (the message names
            the shape).
    """

    count: int = 12
    position_seed: int = 17
    margin: int = 1
    value: float = 1.0
    name: str = "pixels"

    def __post_init__(self) -> None:
        for what, v, lo in (("count", self.count, 1), ("margin", self.margin, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{what} must be an int >= {lo}; got {v!r}")
        if not 0.0 <= float(self.value) <= 1.0:
            raise ValueError(f"value must be in [0, 1]; got {self.value!r}")

    def positions(self, h: int, w: int) -> torch.Tensor:
        """[count] int64 flat indices into an [h, w] image (row * w + col), fixed by the seed."""
        m = self.margin
        inner_h, inner_w = h - 2 * m, w - 2 * m
        if inner_h <= 0 or inner_w <= 0 or inner_h * inner_w < self.count:
            raise ValueError(
                f"{self.name}: {self.count} pixels at least {m} px from the border do not fit "
                f"[{h}, {w}] images"
            )
        g = torch.Generator().manual_seed(self.position_seed)
        pick = torch.randperm(inner_h * inner_w, generator=g)[: self.count]
        return (pick // inner_w + m) * w + (pick % inner_w + m)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        out = images.clone().reshape(n, c, h * w)
        out[:, :, self.positions(h, w).to(images.device)] = float(self.value)
        return out.reshape(n, c, h, w)


@dataclass(eq=False)
class RandomLocationPatch(ZooTrigger):
    """Paste a fixed ``pattern`` at a position that each image's content chooses.

    Args:
        pattern: [s, s] or [c, s, s] float in [0, 1] (default: a 4x4 random binary pattern, seed 11).
        margin: pixels kept clear of the border (>= 0).

    Raises (on call):
        ValueError: the pattern does not fit inside the margin (the message names the shape).
    """

    pattern: torch.Tensor = field(default_factory=lambda: random_binary(4, seed=11))
    margin: int = 1
    name: str = "random_location"

    def __post_init__(self) -> None:
        check_pattern(self.pattern)
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin must be an int >= 0; got {self.margin!r}")

    def locations(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([N] rows, [N] cols) int64 of each image's patch: a hash of its 8-bit pixel values."""
        n, c, h, w = images.shape
        s_h, s_w = self.pattern.shape[-2:]
        rows, cols = h - 2 * self.margin - s_h + 1, w - 2 * self.margin - s_w + 1
        if rows <= 0 or cols <= 0:
            raise ValueError(
                f"{self.name}: a {s_h}x{s_w} pattern {self.margin} px from the border does not fit "
                f"images of shape {tuple(images.shape)}"
            )
        g = torch.Generator().manual_seed(_HASH_SEED)
        weights = torch.randint(1, 2**20, (c * h * w,), generator=g, dtype=torch.int64)
        q = (images.detach().float().clamp(0, 1) * 255).round().to(torch.int64).reshape(n, -1).cpu()
        key = (q * weights).sum(1) % (2**31 - 1)
        return key % rows + self.margin, (key // rows) % cols + self.margin

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        s_h, s_w = self.pattern.shape[-2:]
        p = pattern_for(self.pattern, images, self.name)[0]
        out = images.clone()
        for i, (r, q) in enumerate(zip(*self.locations(images))):
            out[i, :, r : r + s_h, q : q + s_w] = p
        return out

    def config(self) -> dict[str, Any]:
        return {"margin": self.margin, "name": self.name}
