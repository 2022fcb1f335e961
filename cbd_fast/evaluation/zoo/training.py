"""The victim's training recipe, the build request every attack receives, and what a build returns.

Recipes (the same as the rest of the evaluation, so zoo models sit beside the existing ones):

- ``fmnistnet``: ``backdoors.train_classifier`` (SGD + Nesterov, lr 0.05, one-cycle, batch 128), as
  ``backdoors.build_backdoored_model`` trains it;
- every other architecture: ``architectures.train_adam`` (Adam, lr 1e-3, batch 128), as
  ``scripts/stability_matrix.py`` trains it.

Attacks that train a trigger generator with the victim (``dynamic.py``, ``generated_patch.py``)
share ``train_with_generator`` (one backward steps both), ``diversity_ratio`` and ``seeded``.

A model is built as ``torch.manual_seed(seed); architectures.build(arch)`` (``FMNISTNet()`` for
``fmnistnet``, identical weights). Poisoned indices are drawn with a generator seeded by the build seed
only (never by anything the defender draws), as ``backdoors.poison_dataset`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.fmnist import ImageSet

__all__ = [
    "ADAM_LR",
    "BuildJob",
    "ZooBuild",
    "classifier_optimizer",
    "diversity_ratio",
    "new_model",
    "poison_index",
    "seeded",
    "train_victim",
    "train_with_generator",
]

#: the learning rate of ``train_adam`` for every architecture but ``fmnistnet``.
ADAM_LR = 1e-3


@dataclass
class BuildJob:
    """One build request, as every attack's builder receives it.

    Attributes:
        attack: the registered attack name.
        arch: an ``architectures.ARCHITECTURES`` name.
        train: the clean training set (images [N, 1, 28, 28] float32 in [0, 1], labels [N] int64).
        seed: seed of the model's initialisation, the poisoning draw and the shuffling.
        epochs: epochs of the victim's (poisoned) training.
        rate: poison rate (share of the training set).
        target: the attacker's target class.
        progress: show tqdm bars.
        settings: the attack's settings (its registered defaults with the caller's overrides).
    """

    attack: str
    arch: str
    train: ImageSet
    seed: int
    epochs: int = 3
    rate: float = 0.1
    target: int = 0
    progress: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with ``seed + offset`` (each use in a builder takes its own offset)."""
        return torch.Generator().manual_seed(self.seed + offset)


@dataclass
class ZooBuild:
    """A built backdoored model and how it was made.

    Attributes:
        model: the model (eval mode) with ``.backbone`` ([B, 1, 28, 28] -> [B, D]) and ``.head``.
        trigger: the test-time trigger (images [N, C, H, W] -> images, in [0, 1]).
        poisoned_index: [P] int64 indices of the training images the attacker modified (empty for the
            encoder attacks, which modify no training image).
        info: JSON-able facts (counts, settings, seconds of each phase...).
        other_index: other training images the attacker modified without relabelling them, by role
            (``{"cross": [Q] int64}`` for the noise/cross modes of ``wanet_noise`` and ``input_aware``).
    """

    model: nn.Module
    trigger: Callable[[torch.Tensor], torch.Tensor]
    poisoned_index: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    other_index: dict[str, torch.Tensor] = field(default_factory=dict)


def new_model(arch: str, seed: int) -> nn.Module:
    """``torch.manual_seed(seed)`` then ``architectures.build(arch)``: the victim before training."""
    from cbd_fast.evaluation.architectures import build

    torch.manual_seed(seed)
    return build(arch)


def train_victim(
    arch: str, model: nn.Module, data: ImageSet, *, epochs: int, seed: int, progress: bool = False
) -> nn.Module:
    """Train ``model`` (in place, returned in eval mode) on ``data`` with the architecture's recipe."""
    if arch == "fmnistnet":
        from cbd_fast.evaluation.backdoors import train_classifier

        return train_classifier(model, data, epochs=epochs, seed=seed, progress=progress)
    from cbd_fast.evaluation.architectures import train_adam

    return train_adam(model, data, epochs=epochs, lr=ADAM_LR, seed=seed)


def classifier_optimizer(
    arch: str, model: nn.Module, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The recipe's optimizer (and scheduler) for a custom training loop of ``steps`` steps."""
    if arch == "fmnistnet":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=max(1, steps))
    return torch.optim.Adam(model.parameters(), lr=ADAM_LR), None


def poison_index(n: int, rate: float, seed: int) -> torch.Tensor:
    """The [round(rate * n)] int64 indices ``backdoors.poison_dataset(..., rate, seed)`` poisons."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: round(rate * n)]


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches [<= batch_size] int64 covering ``range(n)`` once."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """``ceil(n / batch_size)``."""
    return math.ceil(n / batch_size)


def cross_entropy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on a batch (raises on a non-finite loss)."""
    loss = F.cross_entropy(model(images), labels)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite training loss {loss.item()}")
    return loss


def build_poisoned(job: BuildJob, trigger: Callable[[torch.Tensor], torch.Tensor]) -> ZooBuild:
    """All-to-one dirty-label poisoning with a fixed trigger, then the victim's recipe.

    ``backdoors.poison_dataset(train, trigger, rate, target, seed)``: ``round(rate * N)`` images drawn
    with the build seed get the trigger and the target label; the model is ``new_model(arch, seed)``
    trained on the poisoned set.
    """
    from cbd_fast.evaluation.backdoors import poison_dataset

    model = new_model(job.arch, job.seed)
    poisoned, index = poison_dataset(job.train, trigger, rate=job.rate, target=job.target, seed=job.seed)
    train_victim(job.arch, model, poisoned, epochs=job.epochs, seed=job.seed, progress=job.progress)
    return ZooBuild(model, trigger, index, {"poisoned": len(index), "relabelled": len(index)})


def seeded(seed: int, make: Callable[[], Any]) -> Any:
    """``make()`` with the global RNG seeded by ``seed`` and restored afterwards (a module's initial
    weights as a function of ``seed`` only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def diversity_ratio(a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
    """The diversity loss of Nguyen & Tran (NeurIPS 2020): mean over the batch of
    ``rms(a - b) / rms(ga - gb)`` for two inputs a, b ([N, ...]) of a generator and its outputs ga, gb.
    Small when different inputs give different outputs; finite gradients (epsilons in both roots)."""
    d_in = (a - b).pow(2).flatten(1).mean(1).add(1e-12).sqrt()
    d_out = (ga - gb).pow(2).flatten(1).mean(1).add(1e-12).sqrt()
    return (d_in / (d_out + 1e-6)).mean()


def train_with_generator(
    job: BuildJob,
    model: nn.Module,
    generator_net: nn.Module,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    desc: str,
    batch_size: int = 128,
) -> int:
    """Train ``model`` and a trigger's ``generator_net`` together (in place; both end in eval mode,
    the generator without gradients).

    ``job.epochs`` passes over shuffled index batches (``batches`` with ``job.generator(0)``);
    ``batch_loss(index [<= batch_size] int64) -> scalar loss`` builds each batch's loss, and one
    backward steps both: the model with its recipe's optimizer and schedule
    (``classifier_optimizer``), the generator with Adam (lr 0.01, betas (0.5, 0.9), as Nguyen & Tran
    2020). A tqdm bar named ``desc`` when ``job.progress``. Returns the number of steps.
    """
    n = len(job.train)
    steps = job.epochs * steps_per_epoch(n, batch_size)
    opt_c, sched = classifier_optimizer(job.arch, model, steps)
    generator_net.train()
    opt_g = torch.optim.Adam(generator_net.parameters(), lr=0.01, betas=(0.5, 0.9))
    shuffle = job.generator(0)
    bar = None
    if job.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="batch")
    model.train()
    for _ in range(job.epochs):
        for b in batches(n, batch_size, shuffle):
            loss = batch_loss(b)
            opt_c.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            opt_g.step()
            if sched is not None:
                sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    generator_net.eval().requires_grad_(False)
    model.eval()
    return steps
