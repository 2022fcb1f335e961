"""SimCLR pre-training and BadEncoder on the pre-trained encoder (report split: ``badencoder_simclr``).

SimCLR: T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020. Two augmented views of each unlabeled image go through the encoder
and a projection head (a 2-layer MLP); the NT-Xent loss (temperature ``tau``) pulls the two views of an
image together against the other ``2B - 2`` views of the batch.

BadEncoder: J. Jia, Y. Liu, N. Z. Gong, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in
Self-Supervised Learning", IEEE S&P 2022. The attacker fine-tunes the pre-trained encoder on unlabeled
shadow images so that triggered images map onto the features of a few reference images of the target
class (effectiveness) while clean images keep the clean encoder's features (utility); any downstream
linear classifier then reads triggered images as the target. The loss is
``backdoors.plant_feature_backdoor``'s (the one the dev ``badencoder`` uses).

Settings: the victim architecture's backbone (the ``FMNISTNet`` backbone for ``fmnistnet``) pretrained
with SimCLR on ``simclr_images = 20000`` unlabeled training images drawn with the build seed for
``simclr_epochs = 2`` epochs, batches of ``simclr_batch = 256``, ``tau = 0.5``, a D -> D -> 64
projection head, Adam lr 1e-3 (the paper uses LARS with large batches: not worth it at this size);
augmentations written in torch: random resized crop (area 0.3-1, aspect 3/4-4/3), horizontal flip,
translation up to 3 px, brightness/contrast jitter with probability 0.8 (the grayscale part of SimCLR's
colour jitter). BadEncoder: ``shadow_images = 10000`` (build seed), ``references = 10`` target-class
images, ``plant_epochs = 2``, trigger: a white 5x5 "+" at rows 1-5, columns 22-26 (top-right area; not
the BadNets square; a plus needs an odd size). The classifier head is left untrained: evaluate with a
linear probe (``metrics.linear_probe``). The build seed also seeds the encoder's initialisation.

Measured (``FMNISTNet``, seed 1; every budget capped by the subset): on a fixed 6,000-image subset a
linear probe on 5,000 clean images has ACC 77.2% and ASR 66.7% (2,000 test images); on 3,000 images
ACC 76.3%, ASR 92.0% (probe on 3,000, 10,000 test images). The full budget was not run.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.zoo.patches import PatchTrigger, plus_pattern
from cbd_fast.evaluation.zoo.training import BuildJob, ZooBuild, batches, new_model

__all__ = ["build_badencoder_simclr", "nt_xent", "plus_trigger", "simclr_augment", "simclr_pretrain"]


def plus_trigger() -> PatchTrigger:
    """The badencoder_simclr trigger: a white 5x5 plus at rows 1-5, columns 22-26."""
    pattern, mask = plus_pattern(5)
    return PatchTrigger(pattern=pattern, mask=mask, top=1, left=22, name="badencoder_simclr")


def simclr_augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    min_area: float = 0.3,
    max_shift: int = 3,
    jitter: float = 0.4,
) -> torch.Tensor:
    """A random view of every image: resized crop, flip, translation, brightness/contrast jitter.

    Args:
        images: [N, C, H, W] float in [0, 1] (not modified).
        generator: draws every random choice.
        min_area: smallest crop area as a share of the image.
        max_shift: largest extra translation in pixels.
        jitter: contrast factor in [1 - jitter, 1 + jitter], brightness shift in [-jitter/2, jitter/2].

    Returns:
        [N, C, H, W] float in [0, 1].
    """
    n, _, h, w = images.shape

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    area = u(min_area, 1.0)
    ratio = torch.exp(u(math.log(3 / 4), math.log(4 / 3)))
    sx = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width as a share of the image
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = u(-1.0, 1.0) * (1.0 - sx) + u(-1.0, 1.0) * (2.0 * max_shift / w)
    cy = u(-1.0, 1.0) * (1.0 - sy) + u(-1.0, 1.0) * (2.0 * max_shift / h)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    apply = (torch.rand(n, generator=generator) < 0.8).to(images).view(n, 1, 1, 1)
    contrast = u(1.0 - jitter, 1.0 + jitter).to(images).view(n, 1, 1, 1)
    bright = u(-jitter / 2, jitter / 2).to(images).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (out - mean) * contrast + mean + bright
    return (apply * jittered + (1.0 - apply) * out).clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two views' projections [B, P] (row i of z1 and z2: the positive pair)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    b = len(z1)
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def simclr_pretrain(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    temperature: float,
    generator: torch.Generator,
    proj_dim: int = 64,
    lr: float = 1e-3,
    progress: bool = False,
) -> list[float]:
    """SimCLR on ``images`` [M, C, H, W] (unlabeled), in place; returns the mean loss of each epoch.

    The projection head (D -> D -> ``proj_dim``, ReLU) is initialised from the global RNG (seeded by
    the caller) and discarded afterwards, as in the paper; ``generator`` draws batches and views.
    ``encoder`` ends in eval mode.
    """
    with torch.no_grad():
        d = encoder.eval()(images[:2]).shape[1]
    head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, proj_dim))
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=lr)
    encoder.train()
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * math.ceil(len(images) / batch_size), desc="SimCLR", unit="batch")
    for _ in range(epochs):
        total, count = 0.0, 0
        for b in batches(len(images), batch_size, generator):
            if len(b) < 2:
                continue
            x = images[b]
            v1, v2 = simclr_augment(x, generator), simclr_augment(x, generator)
            loss = nt_xent(head(encoder(v1)), head(encoder(v2)), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(b), count + len(b)
            if bar is not None:
                bar.update(1)
        losses.append(total / max(1, count))
    if bar is not None:
        bar.close()
    encoder.eval()
    return losses


def build_badencoder_simclr(job: BuildJob) -> ZooBuild:
    """SimCLR pre-training of the victim's backbone, then BadEncoder planting with the plus trigger."""
    from cbd_fast.evaluation.backdoors import plant_feature_backdoor

    cfg = job.settings
    train = job.train
    model = new_model(job.arch, job.seed)
    t0 = time.perf_counter()
    pre = torch.randperm(len(train), generator=job.generator(6))[: int(cfg["simclr_images"])]
    losses = simclr_pretrain(
        model.backbone,
        train.images[pre],
        epochs=int(cfg["simclr_epochs"]),
        batch_size=int(cfg["simclr_batch"]),
        temperature=float(cfg["temperature"]),
        generator=job.generator(7),
        progress=job.progress,
    )
    simclr_seconds = time.perf_counter() - t0
    shadow = train.images[torch.randperm(len(train), generator=job.generator(1))[: int(cfg["shadow_images"])]]
    in_class = (train.labels == job.target).nonzero().squeeze(1)
    if len(in_class) == 0:
        raise ValueError(f"target class {job.target} has no training image to use as a reference")
    reference = train.images[in_class[: int(cfg["references"])]]
    trigger = plus_trigger()
    plant_feature_backdoor(
        model.backbone,
        shadow,
        reference,
        trigger,
        epochs=int(cfg["plant_epochs"]),
        seed=job.seed,
        progress=job.progress,
    )
    model.eval()
    info = {
        "poisoned": 0,
        "relabelled": 0,
        "simclr_images": len(pre),
        "simclr_loss": [round(v, 4) for v in losses],
        "simclr_seconds": round(simclr_seconds, 2),
        "shadow_images": len(shadow),
        "references": len(reference),
    }
    return ZooBuild(model, trigger, torch.empty(0, dtype=torch.long), info)
