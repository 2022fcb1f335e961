"""The held-out evaluation protocol: what may be tuned on, what is only reported.

``docs/evaluation.md`` is the written protocol; this module is the code that enforces it.

- **Attacks** are split into a ``dev`` set (anything may be tuned on them: they are the triggers
  the defaults were designed with) and a ``report`` set (never used to choose anything). The split
  of each attack is declared in the attack zoo's registry.
- **Test images** are split once, by a fixed seeded permutation, into ``validation`` (5,000 images,
  for choices) and ``test`` (the other 5,000, for the reported numbers): :func:`split_test_set`.
- **Seeds**: tuning uses :data:`TUNING_SEEDS`, reports use :data:`REPORT_SEEDS`; they are disjoint.
- **The defender's unlabeled images** are drawn by :func:`defender_images` from a random stream
  of their own, independent of the poisoned indices (which come from ``randperm(N, seed)``); the
  old overlapping draw (the clean copies of the first poisoned images) is kept only as an ablation
  (``overlap=True``).

:func:`check_purpose` is called by the evaluation scripts before they run anything: tuning on a
report attack, on the test split or on a report seed raises ``ProtocolError``, and so does
reporting on the validation split.
"""

from __future__ import annotations

import torch

from cbd_fast.evaluation.fmnist import ImageSet

__all__ = [
    "PURPOSES",
    "ProtocolError",
    "REPORT_SEEDS",
    "SPLIT_SEED",
    "TUNING_SEEDS",
    "check_purpose",
    "defender_images",
    "split_test_set",
]

#: what a run is for: "tune" (choices; dev attacks, validation images, tuning seeds) or "report"
PURPOSES = ("tune", "report")
#: seeds of models and defense runs used for choices
TUNING_SEEDS: tuple[int, ...] = (0,)
#: seeds of models and defense runs whose numbers are reported (disjoint from TUNING_SEEDS)
REPORT_SEEDS: tuple[int, ...] = (1, 2, 3)
#: seed of the one permutation that splits the test set into validation and test halves
SPLIT_SEED = 20231
#: the stream that salts the defender's draw (so it is independent of ``randperm(N, seed)``)
_DEFENDER_SALT = 0x5EED_DEF


class ProtocolError(ValueError):
    """A run that would break the held-out protocol (e.g. tuning on a report attack)."""


def split_test_set(test: ImageSet, part: str) -> ImageSet:
    """The ``"validation"`` or ``"test"`` half of the test set (a fixed seeded permutation).

    Args:
        test: the full test set (10,000 Fashion-MNIST images).
        part: ``"validation"`` (the first half of the permutation) or ``"test"`` (the second half).

    Returns:
        an ``ImageSet`` of ``len(test) // 2`` (validation) or the rest (test) images.
    """
    if part not in ("validation", "test"):
        raise ValueError(f"part must be 'validation' or 'test'; got {part!r}")
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(SPLIT_SEED))
    half = len(test) // 2
    return test.subset(perm[:half] if part == "validation" else perm[half:])


def defender_images(
    train: ImageSet,
    fraction: float = 0.05,
    *,
    seed: int,
    overlap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's unlabeled images: a random ``fraction`` of the (clean) training images.

    Args:
        train: the clean training set.
        fraction: share in (0, 1]; 0.05 is 3,000 Fashion-MNIST images.
        seed: the run seed.
        overlap: False (default): a draw from its own random stream, independent of the poisoned
            indices. True (ablation only): the first images of ``randperm(N, seed)``, which are the
            clean copies of the images a model with that seed was poisoned on.

    Returns:
        ``(images [M, C, H, W], index [M] int64)``; labels are not returned (the defense never sees
        them; ``train.labels[index]`` is for label-using baselines).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    m = max(1, round(fraction * len(train)))
    key = seed if overlap else (_DEFENDER_SALT * 1_000_003 + seed) % (2**63 - 1)
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(key))[:m]
    return train.images[index], index


def check_purpose(purpose: str, *, split_of_attack: str, seed: int, images: str) -> None:
    """Raise ``ProtocolError`` unless (attack split, seed, image split) is allowed for ``purpose``.

    Args:
        purpose: ``"tune"`` or ``"report"``.
        split_of_attack: the attack's declared split, ``"dev"`` or ``"report"``.
        seed: the model / run seed.
        images: ``"validation"`` or ``"test"``.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}; got {purpose!r}")
    if split_of_attack not in ("dev", "report"):
        raise ValueError(f"split_of_attack must be 'dev' or 'report'; got {split_of_attack!r}")
    if purpose == "tune":
        if split_of_attack != "dev":
            raise ProtocolError("tuning may use dev attacks only; this attack is in the report set")
        if images != "validation":
            raise ProtocolError(f"tuning may use the validation images only; got {images!r}")
        if seed not in TUNING_SEEDS:
            raise ProtocolError(f"tuning may use the tuning seeds {TUNING_SEEDS} only; got seed {seed}")
    else:
        if images != "test":
            raise ProtocolError(f"reported numbers come from the test images only; got {images!r}")
        if seed not in REPORT_SEEDS:
            raise ProtocolError(f"reported numbers use the report seeds {REPORT_SEEDS} only; got seed {seed}")
