"""A DEV trigger made per image by a generator network: the Backdoor Generating Network (``ban``).

The report split holds a per-image dynamic trigger (``input_aware``: pattern and mask generated from
the image) that remains a large miss, and every dev trigger was the same for every image or varied
only in place. This dev attack has triggers that differ per image and is not the report one:

- the attack: BaN of Salem, Wen, Backes, Ma, Zhang, "Dynamic Backdoor Attacks Against Machine
  Learning Models", IEEE EuroS&P 2022. A generator maps a random noise vector to a trigger pattern;
  each poisoned image gets a fresh pattern at a location drawn from a set of locations; the
  generator and the model are trained together, the generator to make the model send patched images
  to the target, the model on clean and patched images;
- what differs from ``input_aware``: the pattern comes from noise, not from the image (no mask
  generator, no cross-trigger mode), and it is a pasted square at one of a few places.

Settings (for 28 x 28 grayscale on a CPU; the paper's generator and sizes are not copied):
``size = 4`` (a 4 x 4 pattern, 2% of the image), ``positions = 4`` places drawn with ``position_seed``
among the non-overlapping 4 x 4 tiles at least ``margin = 1`` pixel from the border; the generator is
an MLP ``noise_dim = 16 -> hidden = 64 -> C * size * size`` with a sigmoid output, trained by
``training.train_with_generator`` (Adam, lr 0.01, betas (0.5, 0.9), as ``dynamic.py``); the poisoned
images are a fixed draw from the build seed, their noise and location are drawn again in every batch.
Deviation: to keep the patterns from collapsing onto a single one (the generator's loss alone would
allow it), the diversity loss of Nguyen & Tran 2020 (``training.diversity_ratio``),
``lambda_div * ||z - z'|| / ||g(z) - g(z')||``, is added to the loss.

At test time the noise and the location of the i-th image of a call are drawn from a generator
seeded with ``draw_seed``, so a call is deterministic and images of one call get different triggers.
The generator's weights are the trigger's state (``save_trigger`` / ``load_trigger``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.zoo.base import ZooTrigger, check_channels
from cbd_fast.evaluation.zoo.training import (
    BuildJob,
    ZooBuild,
    cross_entropy,
    diversity_ratio,
    new_model,
    seeded,
    train_with_generator,
)

__all__ = ["CITATION", "GeneratedPatch", "build_ban"]

CITATION = (
    "Salem, Wen, Backes, Ma, Zhang. Dynamic Backdoor Attacks Against Machine Learning Models. "
    "IEEE EuroS&P 2022 (Backdoor Generating Network, BaN)"
)


def _positive_int(what: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what} must be an int >= {lo}; got {v!r}")
    return v


class GeneratedPatch(ZooTrigger):
    """Paste ``g(z)`` ([C, size, size] in [0, 1], z ~ U(0, 1)^noise_dim) at one of ``positions`` places.

    Args:
        channels: C of the images.
        size: side of the pasted pattern in pixels.
        noise_dim: length of the noise vector z.
        hidden: width of the generator's hidden layer.
        positions: how many candidate top-left corners.
        position_seed: seed of the corners (drawn per image size, uniformly within the margin).
        margin: pixels kept clear of the border.
        draw_seed: seed of the test-time draws of z and of the corner (per call).
        seed: seed of the generator's initial weights.

    Raises (on call):
        ValueError: another channel count, or an image too small for the pattern inside the margin
            (the message names the shape).
    """

    name = "ban"
    stateful = True

    def __init__(
        self,
        channels: int = 1,
        size: int = 4,
        noise_dim: int = 16,
        hidden: int = 64,
        positions: int = 4,
        position_seed: int = 29,
        margin: int = 1,
        draw_seed: int = 0,
        seed: int = 0,
    ) -> None:
        self.channels = _positive_int("channels", channels)
        self.size = _positive_int("size", size)
        self.noise_dim = _positive_int("noise_dim", noise_dim)
        self.hidden = _positive_int("hidden", hidden)
        self.positions = _positive_int("positions", positions)
        self.margin = _positive_int("margin", margin, 0)
        self.position_seed, self.draw_seed, self.seed = int(position_seed), int(draw_seed), int(seed)
        self.net = seeded(
            self.seed,
            lambda: nn.Sequential(
                nn.Linear(self.noise_dim, self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, self.channels * self.size * self.size),
            ),
        ).eval()

    def corners(self, h: int, w: int) -> torch.Tensor:
        """[positions, 2] int64 (top, left) corners for an h x w image: distinct tiles of a grid of
        stride ``size`` inside the margin (so two places never overlap), drawn with ``position_seed``.

        Raises:
            ValueError: fewer than ``positions`` tiles fit inside the margin (the message names h and w).
        """
        s, m = self.size, self.margin
        tops = torch.arange(m, h - m - s + 1, s)
        lefts = torch.arange(m, w - m - s + 1, s)
        if len(tops) * len(lefts) < self.positions:
            raise ValueError(
                f"{self.name}: {self.positions} places for a {s}x{s} pattern {m} px from the border do not "
                f"fit an image of {h}x{w} pixels"
            )
        grid = torch.cartesian_prod(tops, lefts)
        pick = torch.randperm(len(grid), generator=torch.Generator().manual_seed(self.position_seed))
        return grid[pick[: self.positions]]

    def patterns(self, noise: torch.Tensor) -> torch.Tensor:
        """g(z): noise [N, noise_dim] -> [N, C, size, size] float32 in [0, 1] (differentiable)."""
        out = torch.sigmoid(self.net(noise.to(torch.float32)))
        return out.view(-1, self.channels, self.size, self.size)

    def stamp(self, images: torch.Tensor, patterns: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] with ``patterns`` [N, C, s, s] pasted at corner ``where`` [N] (an index
        into ``corners(H, W)``); differentiable in ``patterns``, ``images`` is not modified."""
        self._check(images)
        h, w = images.shape[-2:]
        s = self.size
        out = images
        for k, (top, left) in enumerate(self.corners(h, w).tolist()):
            pad = (left, w - left - s, top, h - top - s)
            canvas = F.pad(patterns.to(images.dtype), pad)
            inside = F.pad(images.new_ones(1, 1, s, s), pad)
            chosen = (where == k).to(images.dtype).view(-1, 1, 1, 1) * inside
            out = out + chosen * (canvas - out)
        return out

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise [n, noise_dim] float32, where [n] int64)`` drawn with ``generator``."""
        noise = torch.rand(n, self.noise_dim, generator=generator)
        where = torch.randint(self.positions, (n,), generator=generator)
        return noise, where

    def _check(self, images: torch.Tensor) -> None:
        check_channels(images, self.channels, who=self.name, what="the generator makes patterns for")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        try:
            self.corners(*images.shape[-2:])
        except ValueError as exc:
            raise ValueError(f"{exc}; got shape {tuple(images.shape)}") from None
        noise, where = self.draw(len(images), torch.Generator().manual_seed(self.draw_seed))
        pats = self.patterns(noise).to(images.device)
        return self.stamp(images, pats, where.to(images.device))

    def config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "size": self.size,
            "noise_dim": self.noise_dim,
            "hidden": self.hidden,
            "positions": self.positions,
            "position_seed": self.position_seed,
            "margin": self.margin,
            "draw_seed": self.draw_seed,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v for k, v in self.net.state_dict().items()}

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> GeneratedPatch:
        trig = cls(**config)
        net_state = {k[len("net.") :]: v.float() for k, v in state.items() if k.startswith("net.")}
        trig.net.load_state_dict(net_state)
        return trig


def pattern_spread(trigger: GeneratedPatch, n: int = 256, seed: int = 0) -> float:
    """Mean per-pixel standard deviation of ``n`` generated patterns (0 when they all coincide)."""
    with torch.no_grad():
        noise, _ = trigger.draw(n, torch.Generator().manual_seed(seed))
        return float(trigger.patterns(noise).std(dim=0).mean())


def build_ban(job: BuildJob) -> ZooBuild:
    """Train the model and the generator together on a fixed poisoned draw (``rate`` of the images)."""
    cfg = job.settings
    train = job.train
    trigger = GeneratedPatch(
        channels=train.images.shape[1],
        size=int(cfg["size"]),
        noise_dim=int(cfg["noise_dim"]),
        hidden=int(cfg["hidden"]),
        positions=int(cfg["positions"]),
        position_seed=int(cfg["position_seed"]),
        seed=job.seed,
    )
    n = len(train)
    n_bd = round(job.rate * n)
    bd_index = torch.randperm(n, generator=job.generator(0))[:n_bd]
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[bd_index] = True

    model = new_model(job.arch, job.seed)
    lambda_div = float(cfg["lambda_div"])
    draws = job.generator(4)

    def batch_loss(b: torch.Tensor) -> torch.Tensor:
        x, y = train.images[b], train.labels[b]
        bd = poisoned[b]
        parts, labels = [x[~bd]], [y[~bd]]
        aux = x.new_zeros(())
        xb = x[bd]
        if len(xb):
            z, where = trigger.draw(len(xb), draws)
            z2, _ = trigger.draw(len(xb), draws)
            g1 = trigger.patterns(z)
            parts.append(trigger.stamp(xb, g1, where))
            labels.append(torch.full((len(xb),), job.target, dtype=y.dtype))
            aux = lambda_div * diversity_ratio(z, z2, g1, trigger.patterns(z2))
        return cross_entropy(model, torch.cat(parts), torch.cat(labels)) + aux

    steps = train_with_generator(job, model, trigger.net, batch_loss, desc="BaN training")
    info = {
        "poisoned": n_bd,
        "relabelled": n_bd,
        "steps": steps,
        "pattern_spread": round(pattern_spread(trigger), 4),
        "corners": trigger.corners(*train.images.shape[-2:]).tolist(),
    }
    return ZooBuild(model, trigger, bd_index, info)
