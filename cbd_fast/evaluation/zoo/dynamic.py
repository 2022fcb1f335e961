"""Input-aware dynamic backdoor (report split: ``input_aware``).

T. A. Nguyen, A. T. Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020. Recipe: a generator
network makes a pattern ``g(x)`` and a mask ``m(x)`` for each image; the trigger is
``x + m(x) * (g(x) - x)``, different for every image. Training:

1. the mask generator alone, with a density loss ``lambda_norm * relu(mean(m) - density)`` and the
   diversity loss ``||x - x'|| / ||m(x) - m(x')||``, then frozen;
2. the classifier and the pattern generator jointly: backdoor samples (own trigger, target label),
   cross-trigger samples (``x`` with the pattern and mask made for another image ``x'``; label kept,
   so a trigger only works on the image it was made for) and clean samples, with cross-entropy plus
   ``lambda_div * ||x - x'|| / ||g(x) - g(x')||``.

Settings (the paper's unless said): backdoor share = ``rate`` (0.1), cross share ``cross_rate = 0.1``,
``density = 0.032``, ``lambda_norm = 100``, ``lambda_div = 1``, generators' Adam lr 0.01 with betas
(0.5, 0.9). Deviations for 28x28 grayscale on a CPU: a small U-Net generator (``EncoderDecoder``:
3x3 convs of ``width = 8`` and 16 channels, one 2x max-pool, nearest upsampling, a skip connection;
no BatchNorm) instead of the paper's deeper encoder-decoder; the mask generator trains
``mask_steps = 300`` batches of 128 instead of 25 epochs; the backdoor and cross images are fixed
draws from the build seed (recorded) instead of being re-drawn in every batch; the classifier keeps
the architecture's recipe.

The trigger holds the generators' weights: save it with ``save_trigger`` and rebuild it with
``load_trigger`` to measure the attack in another process.

Measured (``FMNISTNet``, seed 1, 3 epochs): on a fixed 6,000-image subset ASR 83.5%, clean ACC 82.2%
(2,000 test images); on 3,000 images ASR 62.8%, ACC 79.6% (10,000 test images) and triggers pasted from
another image (cross mode) 27.4%. Time: the 300-step mask stage took 114 s and the whole 6,000-image
build 159 s on one thread of a shared, busy 2-core machine (load ~7).
"""

from __future__ import annotations

import time
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

__all__ = ["InputAwareTrigger", "build_input_aware"]


class EncoderDecoder(nn.Module):
    """[N, cin, H, W] -> [N, cout, H, W]: a small U-Net (one 2x max-pool, one skip connection).

    ``enc1``: conv(cin -> w) ReLU at full size; ``enc2``: max-pool, conv(w -> 2w) ReLU conv(2w -> 2w)
    ReLU at half size; ``dec``: nearest upsampling, [up, enc1] -> conv(3w -> w) ReLU conv(w -> cout).
    3x3 convolutions, no normalisation layer; any H, W >= 1. ~2M multiply-adds per 28x28 image at w = 8.
    """

    def __init__(self, cin: int, cout: int, width: int = 8) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.dec = nn.Sequential(
            nn.Conv2d(3 * width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, cout, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc1(x)
        b = self.enc2(F.max_pool2d(a, 2, ceil_mode=True))
        up = F.interpolate(b, size=a.shape[-2:], mode="nearest")
        return self.dec(torch.cat([up, a], dim=1))


class InputAwareTrigger(ZooTrigger):
    """``x + m(x) * (g(x) - x)`` with a pattern generator g and a mask generator m (both [0, 1]).

    Args:
        channels: C of the images (the generators are built for it).
        width: generator width.
        seed: seed of the generators' initial weights.

    Raises (on call):
        ValueError: images with another channel count (the message names the shape).
    """

    name = "input_aware"
    stateful = True

    def __init__(self, channels: int = 1, width: int = 8, seed: int = 0) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int; got {channels!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int; got {width!r}")
        self.channels, self.width, self.seed = channels, width, seed
        self.pattern_net = seeded(seed, lambda: EncoderDecoder(channels, channels, width)).eval()
        self.mask_net = seeded(seed + 1, lambda: EncoderDecoder(channels, 1, width)).eval()

    def _check(self, images: torch.Tensor) -> None:
        check_channels(images, self.channels, who=self.name, what="the generators take")

    def patterns(self, images: torch.Tensor) -> torch.Tensor:
        """g(x): [N, C, H, W] in [0, 1] (differentiable)."""
        self._check(images)
        out = self.pattern_net(images.to(torch.float32))
        return ((torch.tanh(out) + 1.0) / 2.0).to(images.dtype)

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """m(x): [N, 1, H, W] in [0, 1] (differentiable)."""
        self._check(images)
        out = self.mask_net(images.to(torch.float32))
        return ((torch.tanh(out) + 1.0) / 2.0).to(images.dtype)

    @staticmethod
    def stamp(images: torch.Tensor, patterns: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``x + m * (g - x)``: images with the given patterns and masks (differentiable)."""
        return images + masks * (patterns - images)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return self.stamp(images, self.patterns(images), self.masks(images))

    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "width": self.width, "seed": self.seed}

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"pattern_net.{k}": v for k, v in self.pattern_net.state_dict().items()}
        sd.update({f"mask_net.{k}": v for k, v in self.mask_net.state_dict().items()})
        return sd

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> InputAwareTrigger:
        trig = cls(**config)
        for prefix, net in (("pattern_net.", trig.pattern_net), ("mask_net.", trig.mask_net)):
            net.load_state_dict(
                {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
            )
        return trig


def train_mask_generator(
    trigger: InputAwareTrigger,
    images: torch.Tensor,
    *,
    steps: int,
    density: float,
    lambda_norm: float,
    lambda_div: float,
    generator: torch.Generator,
    batch_size: int = 128,
) -> None:
    """Stage 1: fit ``trigger.mask_net`` (in place) to masks of mean ``<= density`` that differ per image.

    Args:
        images: [N, C, H, W] training images (not modified).
        steps: optimisation steps (batches of ``batch_size``, pairs drawn with ``generator``).
    """
    net = trigger.mask_net.train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.5, 0.9))
    for _ in range(steps):
        i = torch.randint(len(images), (batch_size,), generator=generator)
        j = torch.randint(len(images), (batch_size,), generator=generator)
        m1, m2 = trigger.masks(images[i]), trigger.masks(images[j])
        loss = lambda_norm * F.relu(m1.mean() - density) + lambda_div * diversity_ratio(
            images[i], images[j], m1, m2
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)


def build_input_aware(job: BuildJob) -> ZooBuild:
    """Stage 1 (mask generator), then stage 2 (classifier + pattern generator) on fixed draws."""
    cfg = job.settings
    train = job.train
    t0 = time.perf_counter()
    trigger = InputAwareTrigger(channels=train.images.shape[1], width=int(cfg["width"]), seed=job.seed)
    train_mask_generator(
        trigger,
        train.images,
        steps=int(cfg["mask_steps"]),
        density=float(cfg["density"]),
        lambda_norm=float(cfg["lambda_norm"]),
        lambda_div=float(cfg["lambda_div"]),
        generator=job.generator(2),
    )
    mask_seconds = time.perf_counter() - t0
    n = len(train)
    n_bd = round(job.rate * n)
    n_cross = min(n - n_bd, round(float(cfg["cross_rate"]) * n))
    perm = torch.randperm(n, generator=job.generator(0))
    bd_index, cross_index = perm[:n_bd], perm[n_bd : n_bd + n_cross]
    role = torch.zeros(n, dtype=torch.long)  # 0 clean, 1 backdoor, 2 cross
    role[bd_index], role[cross_index] = 1, 2

    model = new_model(job.arch, job.seed)
    lambda_div = float(cfg["lambda_div"])
    partner = job.generator(3)

    def batch_loss(b: torch.Tensor) -> torch.Tensor:
        x, y = train.images[b], train.labels[b].clone()
        r = role[b]
        parts, labels = [x[r == 0]], [y[r == 0]]
        aux = x.new_zeros(())
        xb = x[r == 1]
        if len(xb):
            others = train.images[torch.randint(n, (len(xb),), generator=partner)]
            gb, go = trigger.patterns(xb), trigger.patterns(others)
            parts.append(trigger.stamp(xb, gb, trigger.masks(xb)))
            labels.append(torch.full((len(xb),), job.target, dtype=y.dtype))
            aux = lambda_div * diversity_ratio(xb, others, gb, go)
        xc = x[r == 2]
        if len(xc):
            others = train.images[torch.randint(n, (len(xc),), generator=partner)]
            parts.append(trigger.stamp(xc, trigger.patterns(others), trigger.masks(others)))
            labels.append(y[r == 2])
        return cross_entropy(model, torch.cat(parts), torch.cat(labels)) + aux

    steps = train_with_generator(job, model, trigger.pattern_net, batch_loss, desc="input-aware training")
    with torch.no_grad():
        density = float(trigger.masks(train.images[:512]).mean())
    info = {
        "poisoned": n_bd,
        "relabelled": n_bd,
        "cross": n_cross,
        "mask_density": round(density, 4),
        "steps": steps,
        "mask_seconds": round(mask_seconds, 2),
    }
    return ZooBuild(model, trigger, bd_index, info, other_index={"cross": cross_index})
