"""Reflection-style blended trigger (dev split: ``reflection``).

Refool: Y. Liu, X. Ma, J. Bailey, F. Lu, "Reflection Backdoor: A Natural Backdoor Attack on Deep Neural
Networks", ECCV 2020. Their trigger is a reflection image: a second scene, out of focus (convolved with
a Gaussian kernel), blended into the input, so the whole image changes a little and smoothly, with no
patch. Here the reflection is a procedurally drawn scene (a few seeded ellipses of random brightness on
a dark background, no photograph ships with the package), blurred with a Gaussian whose width scales
with the image (``blur`` x the shorter side: 1.7 px at 28x28), normalised to a maximum of 1, and
blended convexly as in Blended (Chen et al. 2017): ``x' = (1 - alpha) * x + alpha * r`` with
``alpha = 0.15``. Deviation from Refool: dirty-label poisoning (the paper poisons clean-label, and
picks reflections from real photographs by their attack success); the out-of-focus reflection model
is the paper's.

A dev attack: it is a global, smooth blend (the image dims by ``alpha`` while a smooth key is added),
a trigger class whose only other dev member blends noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cbd_fast.evaluation.zoo.base import ZooTrigger

__all__ = ["ReflectionBlend", "reflection_key"]

CITATION = (
    "Liu, Ma, Bailey, Lu. Reflection Backdoor: A Natural Backdoor Attack on Deep Neural Networks. "
    "ECCV 2020 (out-of-focus reflection key); blended as in Chen, Liu, Li, Lu, Song. Targeted Backdoor "
    "Attacks on Deep Learning Systems Using Data Poisoning. arXiv:1712.05526, 2017"
)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """[h, w] float64 blurred by a separable Gaussian of std ``sigma`` px (replicated borders)."""
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = img[None, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return x[0, 0]


def _check_scene(shapes: object, blur: object) -> None:
    """Raise ``ValueError`` unless ``shapes`` is an int >= 1 and ``blur`` is in (0, 0.5]."""
    if isinstance(shapes, bool) or not isinstance(shapes, int) or shapes < 1:
        raise ValueError(f"shapes must be an int >= 1; got {shapes!r}")
    if not isinstance(blur, (int, float)) or not 0.0 < blur <= 0.5:
        raise ValueError(f"blur must be in (0, 0.5] (a fraction of the image side); got {blur!r}")


def reflection_key(h: int, w: int, *, seed: int, shapes: int = 5, blur: float = 0.06) -> torch.Tensor:
    """An out-of-focus procedural scene: [h, w] float32 in [0, 1], maximum 1.

    ``shapes`` ellipses with seeded centres (anywhere in the image), radii (10-35% of the side) and
    brightness (0.4-1.0) on a black background, overlapping ones taking the brighter value, then a
    Gaussian blur of std ``blur * min(h, w)`` px. The drawing depends on (h, w, seed) only and scales
    with the image.
    """
    if h < 4 or w < 4:
        raise ValueError(f"a reflection key needs an image of at least 4x4; got {h}x{w}")
    _check_scene(shapes, blur)
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(shapes, 5, generator=g, dtype=torch.float64)
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    scene = torch.zeros(h, w, dtype=torch.float64)
    for cy, cx, ry, rx, v in u:
        ry, rx = 0.10 + 0.25 * ry, 0.10 + 0.25 * rx
        inside = ((ys[:, None] - cy) / ry) ** 2 + ((xs[None, :] - cx) / rx) ** 2 <= 1.0
        scene = torch.where(inside, torch.maximum(scene, 0.4 + 0.6 * v), scene)
    soft = _gaussian_blur(scene, blur * min(h, w))
    peak = float(soft.max())
    if peak <= 0.0:  # pragma: no cover - every ellipse has its centre inside the image
        raise RuntimeError("the reflection scene came out empty")
    return (soft / peak).clamp(0.0, 1.0).float()


@dataclass(eq=False)
class ReflectionBlend(ZooTrigger):
    """``(1 - alpha) * x + alpha * reflection_key(H, W)`` for every channel; any [N, C, H, W].

    Args:
        alpha: blend ratio in (0, 1].
        seed: seed of the drawn scene.
        shapes: number of ellipses in the scene.
        blur: the Gaussian's std as a fraction of the shorter image side.
    """

    alpha: float = 0.15
    seed: int = 23
    shapes: int = 5
    blur: float = 0.06
    name: str = "reflection"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1]; got {self.alpha!r}")
        _check_scene(self.shapes, self.blur)

    def key(self, h: int, w: int) -> torch.Tensor:
        """The [h, w] reflection key."""
        return reflection_key(h, w, seed=self.seed, shapes=self.shapes, blur=self.blur)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        k = self.key(*images.shape[-2:]).to(images)
        return (1.0 - self.alpha) * images + self.alpha * k
