"""Label-consistent (clean-label) backdoor (report split: ``label_consistent``).

A. Turner, D. Tsipras, A. Madry, "Label-Consistent Backdoor Attacks", arXiv:1912.02771, 2019. Recipe:
poison only images of the target class and keep their (correct) labels. To make the model rely on the
trigger, each poisoned image is first made hard to classify with an L-inf bounded PGD adversarial
perturbation computed on a separately trained model; then the trigger is stamped: a small black/white
pattern in all four corners (mirrored, so it survives flips), at reduced amplitude during training and
full amplitude at test time.

Settings: a surrogate ``FMNISTNet`` trained by the attacker on the clean training set
(``surrogate_epochs = 1``, SGD one-cycle, seed ``seed + 17``); untargeted PGD on its cross-entropy,
``eps = 32/255``, ``pgd_steps = 10``, step ``2.5 * eps / steps``, no random start; trigger: a 3x3
checkerboard in each corner, 1 px from the border, training amplitude ``train_amplitude`` (the pixels
move by at most that much toward the pattern), test amplitude 1. Poisoned count:
``min(round(rate * N), images of the target class)`` drawn with the build seed; on Fashion-MNIST at
``rate = 0.1`` that is every target-class image (the top of the paper's range). Deviation: the
surrogate is a standard (not adversarially trained) model, and it is always an ``FMNISTNet`` whatever
the victim's architecture (a transfer setting).

``train_amplitude = 64/255`` (Turner et al.'s reduced amplitude). Measured (``FMNISTNet``, seed 1,
3 epochs on a fixed 6,000-image subset, 2,000 test images): ASR 100%, clean ACC 79.9% (at amplitude
0.5: ASR 100%, ACC 79.2%); the surrogate misclassified 98.7% of the PGD images.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.fmnist import ImageSet
from cbd_fast.evaluation.zoo.patches import CornerPatterns, checkerboard
from cbd_fast.evaluation.zoo.training import BuildJob, ZooBuild, new_model, train_victim

__all__ = ["build_label_consistent", "corner_trigger", "pgd_linf", "poison_label_consistent"]

_SURROGATE_SEED_OFFSET = 17


def corner_trigger(amplitude: float = 1.0) -> CornerPatterns:
    """The four-corner trigger (3x3 checkerboard, 1 px in) at ``amplitude``."""
    return CornerPatterns(pattern=checkerboard(3), margin=1, amplitude=amplitude, name="label_consistent")


def pgd_linf(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    steps: int,
    batch_size: int = 500,
) -> torch.Tensor:
    """Untargeted L-inf PGD on ``model``'s cross-entropy: [N, C, H, W] in [0, 1] -> perturbed copies.

    ``x_{t+1} = clip_{x, eps}(x_t + alpha * sign(grad))``, ``alpha = 2.5 * eps / steps``, kept in [0, 1];
    ``model`` runs in eval mode without parameter gradients (its flags are restored).
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1]; got {eps!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps!r}")
    alpha = 2.5 * eps / max(1, steps)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x0, y = images[i : i + batch_size], labels[i : i + batch_size]
            x = x0.clone()
            for _ in range(steps):
                x.requires_grad_(True)
                loss = F.cross_entropy(model(x), y)
                (grad,) = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    x = torch.min(torch.max(x + alpha * grad.sign(), x0 - eps), x0 + eps).clamp(0.0, 1.0)
            out.append(x.detach())
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return torch.cat(out) if out else images.clone()


def poison_label_consistent(
    train: ImageSet,
    surrogate: nn.Module,
    *,
    rate: float,
    target: int,
    eps: float,
    steps: int,
    amplitude: float,
    seed: int,
) -> tuple[ImageSet, torch.Tensor, float]:
    """Clean-label poisoning (``train`` is not modified; labels are never changed).

    ``min(round(rate * N), images of class target)`` target-class images drawn with ``seed`` get a PGD
    perturbation on ``surrogate`` (``eps``, ``steps``) and then the four-corner trigger at
    ``amplitude``.

    Returns:
        ``(poisoned set, [P] int64 poisoned indices, share of them the surrogate misclassifies)``.

    Raises:
        ValueError: no training image of the target class.
    """
    in_class = (train.labels == target).nonzero().squeeze(1)
    if len(in_class) == 0:
        raise ValueError(f"target class {target} has no training image; a clean-label attack needs some")
    count = min(round(rate * len(train)), len(in_class))
    index = in_class[torch.randperm(len(in_class), generator=torch.Generator().manual_seed(seed))[:count]]
    hard = pgd_linf(surrogate, train.images[index], train.labels[index], eps=eps, steps=steps)
    fooled = 0.0
    if count:
        with torch.no_grad():
            was_training = surrogate.training
            fooled = float((surrogate.eval()(hard).argmax(1) != target).float().mean())
            surrogate.train(was_training)
    images = train.images.clone()
    images[index] = corner_trigger(amplitude)(hard)
    return ImageSet(images, train.labels.clone()), index, fooled


def build_label_consistent(job: BuildJob) -> ZooBuild:
    """Surrogate, PGD on chosen target-class images, corner trigger, clean-label training."""
    cfg = job.settings
    train = job.train
    if not bool((train.labels == job.target).any()):
        raise ValueError(f"target class {job.target} has no training image; a clean-label attack needs some")
    t0 = time.perf_counter()
    surrogate = new_model("fmnistnet", job.seed + _SURROGATE_SEED_OFFSET)
    train_victim(
        "fmnistnet",
        surrogate,
        train,
        epochs=int(cfg["surrogate_epochs"]),
        seed=job.seed + _SURROGATE_SEED_OFFSET,
        progress=job.progress,
    )
    poisoned, index, fooled = poison_label_consistent(
        train,
        surrogate,
        rate=job.rate,
        target=job.target,
        eps=float(cfg["eps"]),
        steps=int(cfg["pgd_steps"]),
        amplitude=float(cfg["train_amplitude"]),
        seed=job.seed,
    )
    attack_seconds = time.perf_counter() - t0
    model = new_model(job.arch, job.seed)
    train_victim(job.arch, model, poisoned, epochs=job.epochs, seed=job.seed, progress=job.progress)
    in_class = int((train.labels == job.target).sum())
    info = {
        "poisoned": len(index),
        "relabelled": 0,
        "target_class_share": round(len(index) / in_class, 4),
        "surrogate_fooled": round(fooled, 4),
        "surrogate_and_pgd_seconds": round(attack_seconds, 2),
    }
    return ZooBuild(model, corner_trigger(1.0), index, info)
