"""A DEV trigger of the optimised-patch kind: a targeted adversarial patch used as the backdoor trigger.

The report split holds an optimised patch (``trojannn``: pixels optimised to excite internal units)
that the mask scan's constant and random squares do not find. The first seven dev attacks have only
fixed, hand-made patterns, so nothing could be measured on an optimised pattern without report
numbers. This dev attack is of that kind and is not the report one:

- the patch: a universal adversarial patch (Brown, Mane, Roy, Abadi, Gilmer, "Adversarial Patch",
  arXiv:1712.09665, 2017): the pixels of a ``size`` x ``size`` square at (``top``, ``left``) optimised
  on a clean surrogate so that patched images go to the target class (mean log-probability of the
  target over ``patch_images`` training images of the other classes; Adam, lr 0.1, ``patch_steps``);
- the backdoor: that patch as a dirty-label poisoning trigger for a model trained from scratch, as
  AdvDoor does with targeted universal adversarial perturbations (Q. Zhang et al., "AdvDoor:
  Adversarial Backdoor Attack of Deep Learning System", ISSTA 2021).

What differs from ``trojannn``: the objective (the target class's output, not chosen units), the
victim (trained from scratch on the poisoned set, not the surrogate fine-tuned), the size (4x4) and
the place (rows 12-15, columns 22-25: the right edge, mid-height).

The optimised patch is the trigger's state (``save_trigger`` / ``load_trigger``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from cbd_fast.evaluation.zoo.optimized_patch import OptimizedPatch, optimise_pasted_pattern
from cbd_fast.evaluation.zoo.training import BuildJob, ZooBuild, new_model, train_victim

__all__ = ["CITATION", "build_adversarial_patch", "initial_trigger"]

CITATION = (
    "Brown, Mane, Roy, Abadi, Gilmer. Adversarial Patch. arXiv:1712.09665, 2017; as a poisoning trigger: "
    "Zhang et al. AdvDoor: Adversarial Backdoor Attack of Deep Learning System. ISSTA 2021"
)


def initial_trigger(size: int, top: int, left: int) -> OptimizedPatch:
    """The untrained trigger (a seeded random patch of the right size and place): what
    ``registry.test_trigger`` returns before a build has optimised the pattern."""
    pattern = torch.rand(1, size, size, generator=torch.Generator().manual_seed(0))
    return OptimizedPatch(pattern=pattern, top=top, left=left, name="adversarial_patch")


def build_adversarial_patch(job: BuildJob) -> ZooBuild:
    """Surrogate training, patch optimisation toward the target, poisoned training from scratch."""
    from cbd_fast.evaluation.backdoors import poison_dataset

    cfg = job.settings
    size, top, left = int(cfg["size"]), int(cfg["top"]), int(cfg["left"])
    t0 = time.perf_counter()
    surrogate = new_model(job.arch, job.seed + 1000)
    train_victim(
        job.arch, surrogate, job.train, epochs=job.epochs, seed=job.seed + 1000, progress=job.progress
    )
    surrogate_seconds = time.perf_counter() - t0
    others = (job.train.labels != job.target).nonzero().squeeze(1)
    pick = others[torch.randperm(len(others), generator=job.generator(8))[: int(cfg["patch_images"])]]

    def target_log_prob(x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(surrogate(x).float(), dim=1)[:, job.target]

    pattern, stats = optimise_pasted_pattern(
        surrogate,
        target_log_prob,
        job.train.images[pick],
        size=size,
        top=top,
        left=left,
        steps=int(cfg["patch_steps"]),
        generator=job.generator(9),
    )
    trigger = OptimizedPatch(pattern=pattern, top=top, left=left, name="adversarial_patch")
    model = new_model(job.arch, job.seed)
    poisoned, index = poison_dataset(job.train, trigger, rate=job.rate, target=job.target, seed=job.seed)
    train_victim(job.arch, model, poisoned, epochs=job.epochs, seed=job.seed, progress=job.progress)
    info = {
        "poisoned": len(index),
        "relabelled": len(index),
        "surrogate_target_log_prob": {k: round(v, 4) for k, v in stats.items()},
        "surrogate_training_seconds": round(surrogate_seconds, 2),
    }
    return ZooBuild(model, trigger, index, info)
