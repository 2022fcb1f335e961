"""Backdoor attacks FOR EVALUATION AND TESTS ONLY: the threats cbd_fast is measured against.

Nothing here is part of the defense. It builds backdoored models so the defense can be evaluated:
poisoning transforms (``Trigger`` subclasses: BadNets, Blended, SIG, WaNet), poisoned supervised
training (``poison_dataset``, ``train_classifier``), and a self-supervised case: a BadEncoder-style
feature-space backdoor planted into a clean encoder that has no head (``plant_feature_backdoor``),
evaluated by a linear probe (``cbd_fast.evaluation.metrics.linear_probe``).

Conventions (BackdoorBench): 10% poison rate, all-to-one, target class 0; all configurable.
Images are float tensors in [0, 1] of shape [N, C, H, W]; every trigger keeps that range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.core.modes import is_batchnorm
from cbd_fast.evaluation.fmnist import ImageSet

__all__ = [
    "ATTACKS",
    "BadNets",
    "Blended",
    "SIG",
    "Trigger",
    "WaNet",
    "make_trigger",
    "plant_feature_backdoor",
    "poison_dataset",
    "train_classifier",
]


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise TypeError(
            "images must be a float tensor [N, C, H, W]; got "
            f"{type(images).__name__} {getattr(images, 'shape', None)} {getattr(images, 'dtype', None)}"
        )


class Trigger:
    """A poisoning transform: ``apply(images) -> triggered images`` (new tensor, range [0, 1])."""

    name = "trigger"

    def apply(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.apply(images).clamp_(0.0, 1.0)


@dataclass
class BadNets(Trigger):
    """A ``size`` x ``size`` patch of value ``value`` in the bottom-right corner (``margin`` pixels in).

    Args:
        size: patch side in pixels (3: the BackdoorBench 3x3 white square).
        value: patch intensity in [0, 1].
        margin: distance of the patch from the bottom and right edges in pixels.
    """

    size: int = 3
    value: float = 1.0
    margin: int = 0
    name = "badnets"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if not 0 < self.size + self.margin <= min(h, w):
            raise ValueError(f"size + margin must fit the {h}x{w} image; got {self.size} + {self.margin}")
        out = images.clone()
        r1, c1 = h - self.margin, w - self.margin
        out[..., r1 - self.size : r1, c1 - self.size : c1] = self.value
        return out


@dataclass
class Blended(Trigger):
    """``(1 - alpha) * x + alpha * pattern`` with a fixed pattern (seeded uniform noise by default).

    Args:
        alpha: blend ratio in [0, 1] (0.2: BackdoorBench's default).
        seed: seed of the noise pattern (ignored when ``pattern`` is given).
        pattern: optional fixed [C, H, W] image in [0, 1].
    """

    alpha: float = 0.2
    seed: int = 1234
    pattern: torch.Tensor | None = None
    name = "blended"

    def _pattern(self, images: torch.Tensor) -> torch.Tensor:
        if self.pattern is not None:
            return self.pattern.to(images)
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(images.shape[1:], generator=g).to(images)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha}")
        return (1.0 - self.alpha) * images + self.alpha * self._pattern(images)


@dataclass
class SIG(Trigger):
    """Sinusoidal signal (Barni et al. 2019): ``x + delta * sin(2 pi j f / W)`` along the columns j.

    Args:
        delta: amplitude (20/255 as in the paper, here 0.1 so a 3-epoch poisoned training learns it).
        frequency: periods across the image width.
    """

    delta: float = 0.1
    frequency: float = 6.0
    name = "sig"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        w = images.shape[-1]
        j = torch.arange(w, dtype=images.dtype, device=images.device)
        signal = self.delta * torch.sin(2.0 * math.pi * j * self.frequency / w)
        return images + signal.view(1, 1, 1, w)


@dataclass
class WaNet(Trigger):
    """Smooth warping (Nguyen & Tran 2021): a fixed random k x k flow field, upsampled bicubically.

    Args:
        k: control grid size.
        strength: warp strength s (displacement ~ s pixels at most; the paper's 0.5 is not learned in
            3 epochs at 28x28, so the default is 1.0).
        seed: seed of the flow field.
    """

    k: int = 4
    strength: float = 1.0
    seed: int = 4321
    name = "wanet"

    def grid(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The [1, h, w, 2] sampling grid (normalised coordinates) of the warp."""
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        flow = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack([xs, ys], dim=-1)[None]
        scale = torch.tensor([2.0 / w, 2.0 / h])  # one pixel in normalised coordinates
        return (identity + self.strength * flow * scale).clamp(-1, 1).to(device)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        grid = self.grid(h, w, images.device).to(images.dtype).expand(n, h, w, 2)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


ATTACKS: dict[str, type[Trigger]] = {"badnets": BadNets, "blended": Blended, "sig": SIG, "wanet": WaNet}


def make_trigger(name: str, **kwargs: object) -> Trigger:
    """The trigger called ``name`` (one of ``ATTACKS``), built with ``kwargs``."""
    if name not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}; got {name!r}")
    return ATTACKS[name](**kwargs)  # type: ignore[arg-type]


def poison_dataset(
    data: ImageSet,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    *,
    rate: float = 0.1,
    target: int = 0,
    seed: int = 0,
) -> tuple[ImageSet, torch.Tensor]:
    """All-to-one poisoning: stamp ``rate`` of the images with the trigger and relabel them ``target``.

    Args:
        data: the clean training set (not modified).
        trigger: the poisoning transform.
        rate: poison rate in [0, 1].
        target: the attacker's target class.
        seed: seed of the choice of poisoned images.

    Returns:
        ``(poisoned_set, poisoned_index)``: a new ``ImageSet`` and the [P] int64 indices poisoned.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1]; got {rate}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[: round(rate * len(data))]
    images, labels = data.images.clone(), data.labels.clone()
    images[idx] = trigger(images[idx])
    labels[idx] = target
    return ImageSet(images, labels), idx


def train_classifier(
    model: nn.Module,
    data: ImageSet,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Supervised training with cross-entropy, SGD + Nesterov momentum and a one-cycle schedule, in place.

    Args:
        model: a classifier ``images -> logits`` (trained in place and returned).
        data: the (possibly poisoned) training set.
        epochs, batch_size, lr, weight_decay: optimisation settings.
        seed: seed of the shuffling.
        progress: show a tqdm progress bar.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="backdoor training", unit="batch")
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(data.images[b]), data.labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return model


def plant_feature_backdoor(
    encoder: nn.Module,
    shadow: torch.Tensor,
    reference: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """BadEncoder-style (Jia et al. 2022) self-supervised backdoor, in place: no labels, no head.

    Fine-tunes ``encoder`` so that triggered shadow images map onto the features of the attacker's
    reference images (of the target class), while clean images keep the frozen original's features:
    ``loss = -cos(f(T(x)), mean f0(ref)) - cos(f(ref), f0(ref)) - cos(f(x), f0(x))``. A linear probe
    trained later on clean labeled data then reads triggered images as the target class.

    Args:
        encoder: images -> features (modified in place, returned in eval mode).
        shadow: [M, C, H, W] unlabeled images in [0, 1] (the attacker's shadow data).
        reference: [R, C, H, W] images of the target class.
        trigger: the poisoning transform.
        epochs, batch_size, lr: optimisation (Adam).
        seed: seed of the shuffling.
        progress: show a tqdm progress bar.
    """
    import copy

    frozen = copy.deepcopy(encoder).eval().requires_grad_(False)
    with torch.no_grad():
        ref0 = frozen(reference)
        ref_centroid = F.normalize(ref0, dim=1).mean(0, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(encoder.parameters(), lr=lr)
    encoder.train()
    # BatchNorm statistics stay those of the clean encoder: the attacker ships clean-looking stats.
    for m in encoder.modules():
        if is_batchnorm(m):
            m.eval()
    steps = epochs * math.ceil(len(shadow) / batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="planting feature backdoor", unit="batch")
    for _ in range(epochs):
        perm = torch.randperm(len(shadow), generator=g)
        for i in range(0, len(shadow), batch_size):
            x = shadow[perm[i : i + batch_size]]
            with torch.no_grad():
                f0 = frozen(x)
            ft = encoder(trigger(x))
            fr = encoder(reference)
            fc = encoder(x)
            loss = (
                -F.cosine_similarity(ft, ref_centroid.expand_as(ft)).mean()
                - F.cosine_similarity(fr, ref0).mean()
                - F.cosine_similarity(fc, f0).mean()
                + 0.1 * F.mse_loss(fc, f0)  # keep the feature scale too
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    encoder.eval()
    return encoder


#: Attack names the evaluation knows: the four supervised ones plus the self-supervised case.
SUPERVISED_ATTACKS: tuple[str, ...] = ("badnets", "blended", "sig", "wanet")
SELF_SUPERVISED_ATTACKS: tuple[str, ...] = ("badencoder",)


def build_backdoored_model(
    attack: str,
    train: ImageSet,
    *,
    seed: int = 0,
    epochs: int = 3,
    rate: float = 0.1,
    target: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Train a backdoored ``FMNISTNet`` (deterministic for a given ``seed`` on one thread).

    Supervised attacks (``SUPERVISED_ATTACKS``): poisoned training from scratch. ``"badencoder"``:
    clean training, then the head is discarded (set to identity-free random weights the defense never
    reads) and a feature-space backdoor with the BadNets patch is planted into the backbone; evaluate it
    with a linear probe. Returns the model in eval mode.
    """
    from cbd_fast.evaluation.models import FMNISTNet

    torch.manual_seed(seed)
    model = FMNISTNet()
    if attack in SUPERVISED_ATTACKS:
        poisoned, _ = poison_dataset(train, make_trigger(attack), rate=rate, target=target, seed=seed)
        return train_classifier(model, poisoned, epochs=epochs, seed=seed, progress=progress)
    if attack == "badencoder":
        train_classifier(model, train, epochs=epochs, seed=seed, progress=progress)
        g = torch.Generator().manual_seed(seed + 1)
        perm = torch.randperm(len(train), generator=g)
        shadow = train.images[perm[:10000]]
        ref = train.images[(train.labels == target).nonzero().squeeze(1)[:10]]
        plant_feature_backdoor(model.backbone, shadow, ref, BadNets(), epochs=2, seed=seed, progress=progress)
        return model
    raise ValueError(f"attack must be one of {SUPERVISED_ATTACKS + SELF_SUPERVISED_ATTACKS}; got {attack!r}")


def trigger_for(attack: str) -> Trigger:
    """The test-time trigger of ``attack`` (``"badencoder"`` uses the BadNets patch)."""
    return BadNets() if attack == "badencoder" else make_trigger(attack)
