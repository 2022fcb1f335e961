"""The attack zoo, FOR EVALUATION ONLY: 23 backdoor attacks on the evaluation's architectures.

Nothing here is part of the defense. Eleven ``dev`` attacks (the ones the defense may be tuned on: the
first five delegated to ``cbd_fast.evaluation.backdoors`` so their models are bit-identical) and twelve
``report`` attacks (never used for tuning), each following its paper (see each module's docstring for
the recipe, the settings and the deviations forced by 28x28 grayscale and a CPU budget).

    >>> from cbd_fast.evaluation import zoo                                         # doctest: +SKIP
    >>> model, trigger = zoo.build("bpp", "fmnistnet", train, seed=1)             # doctest: +SKIP
    >>> zoo.attack_names("report")[:3]                                            # doctest: +SKIP
    ['badnets_checker', 'badnets_random', 'blended_image']

Modules: ``registry`` (the table), ``build`` (building, storing, reloading), ``training`` (victim
recipes), ``dev``, ``patches``, ``blends``, ``warps``, ``frequency``, ``quantize``, ``filters``,
``dynamic``, ``sample_specific``, ``optimized_patch``, ``clean_label``, ``encoder``, ``sparse``,
``adversarial_patch``, ``reflection``, ``generated_patch``, ``edges``.
"""

from __future__ import annotations

from cbd_fast.evaluation.zoo.base import ZooTrigger, save_trigger
from cbd_fast.evaluation.zoo.build import build, build_record, load_build, save_build, stem_paths
from cbd_fast.evaluation.zoo.registry import (
    KINDS,
    SPLITS,
    ZOO,
    ZooAttack,
    attack_names,
    get_attack,
    load_trigger,
    resolve_settings,
    select,
    test_trigger,
)
from cbd_fast.evaluation.zoo.training import ZooBuild

__all__ = [
    "KINDS",
    "SPLITS",
    "ZOO",
    "ZooAttack",
    "ZooBuild",
    "ZooTrigger",
    "attack_names",
    "build",
    "build_record",
    "get_attack",
    "load_build",
    "load_trigger",
    "resolve_settings",
    "save_build",
    "save_trigger",
    "select",
    "stem_paths",
    "test_trigger",
]
