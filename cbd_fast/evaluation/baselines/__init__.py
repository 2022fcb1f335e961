"""Baseline defenses run side by side with CBD on the same model and the same images (evaluation).

The original four (``simple``), taking ``(backbone, head)`` or a backbone:

- ``no_defense``: the backbone as downloaded.
- ``plain_finetune``: ``cbd_fast.purify`` with no adversary (label-free): isolates what the adversary adds.
- ``supervised_finetune``: cross-entropy fine-tuning of backbone + head on the defender's LABELED images.
- ``adversarial_unlearning``: CE-PGD adversaries of the true label + cross-entropy training (labels).

The published label-using defenses, each ``f(model, images, labels, *, seed=0, **hyper) -> new model``
for a whole classifier (``model.backbone`` + ``model.head`` where a layer must be found), with the
defender's small labeled clean set (the same data budget as the label-free defense), paper defaults and
validated keyword arguments; each module's docstring states the algorithm and the deviations:

- ``fine_tuning`` (``finetuning``): supervised fine-tuning of all layers (Liu et al. RAID 2018's FT
  baseline; BackdoorBench's recipe).
- ``fine_pruning`` (``fineprune``): Liu, Dolan-Gavitt & Garg, RAID 2018.
- ``nad`` (``distillation``): Neural Attention Distillation, Li et al., ICLR 2021.
- ``anp`` (``neuron_pruning``): Adversarial Neuron Pruning, Wu & Wang, NeurIPS 2021.
- ``i_bau`` (``hypergradient``): Zeng et al., ICLR 2022, with the implicit hypergradient
  (``implicit_hypergradient``).

``LABELED_BASELINES`` maps these names to the functions. Every function returns a deep copy; its
inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Callable

from cbd_fast.evaluation.baselines.distillation import nad
from cbd_fast.evaluation.baselines.fineprune import fine_pruning
from cbd_fast.evaluation.baselines.finetuning import fine_tuning
from cbd_fast.evaluation.baselines.hypergradient import i_bau, implicit_hypergradient
from cbd_fast.evaluation.baselines.neuron_pruning import anp
from cbd_fast.evaluation.baselines.simple import (
    adversarial_unlearning,
    no_defense,
    plain_finetune,
    supervised_finetune,
)

__all__ = [
    "LABELED_BASELINES",
    "adversarial_unlearning",
    "anp",
    "fine_pruning",
    "fine_tuning",
    "i_bau",
    "implicit_hypergradient",
    "nad",
    "no_defense",
    "plain_finetune",
    "supervised_finetune",
]

#: name -> ``f(model, images, labels, *, seed=0, **hyper) -> new model`` (the published label-using defenses).
LABELED_BASELINES: dict[str, Callable[..., object]] = {
    "fine_tuning": fine_tuning,
    "fine_pruning": fine_pruning,
    "nad": nad,
    "anp": anp,
    "i_bau": i_bau,
}
