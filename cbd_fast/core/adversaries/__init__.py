"""Adversaries used inside the CBD loop (step 2: evoke the backdoor), as a small registry.

``PurifyConfig.adversary`` names an entry of :data:`ADVERSARIES`. An adversary receives an
:class:`AttackInputs` (clean batch, clean anchors, sample indices, epoch, ...) and returns the
detached adversarial batch. Adding a candidate is one class:

    >>> from cbd_fast.core.adversaries import Adversary, register_adversary
    >>> from cbd_fast.core.rng import per_sample_uniform, random_start
    >>> @register_adversary("noise")                                         # doctest: +SKIP
    ... class UniformNoise(Adversary):
    ...     def __call__(self, inp):
    ...         u = per_sample_uniform(inp.indices, inp.x.shape[1:], seed=inp.config.seed, epoch=inp.epoch)
    ...         return random_start(inp.x, u, inp.config.epsilon)

An adversary's own settings are declared in its ``OPTIONS`` (name -> :class:`Option`: default, type,
range) and set with ``PurifyConfig(adversary_options={...})``; unknown keys and bad values are rejected
when the config is validated.

Randomness is drawn per sample from (seed, epoch, sample index) by
:func:`cbd_fast.core.rng.per_sample_uniform`, a counter-based hash evaluated on the images' device:
the same sample gets the same random start whatever the batch composition, the number of ranks or
the device, so distributed runs and resumed runs reproduce single-process ones.

Modules: ``base`` (the interface and the registry), ``pgd`` (the paper's per-sample PGD, and none),
``patch`` (a universal patch search), ``warp`` (universal smooth warps), ``search`` (the
label-free trigger search over six transform families), ``transforms`` (their differentiable
transforms).
"""

from cbd_fast.core.adversaries.base import (
    ADVERSARIES,
    Adversary,
    AttackInputs,
    Option,
    make_adversary,
    register_adversary,
)
from cbd_fast.core.adversaries.patch import PGDAndPatch
from cbd_fast.core.adversaries.pgd import ContrastivePGD, NoAdversary
from cbd_fast.core.adversaries.search import TriggerSearch
from cbd_fast.core.adversaries.warp import PGDPatchWarp

__all__ = [
    "ADVERSARIES",
    "Adversary",
    "AttackInputs",
    "Option",
    "make_adversary",
    "register_adversary",
    "ContrastivePGD",
    "NoAdversary",
    "PGDAndPatch",
    "PGDPatchWarp",
    "TriggerSearch",
]
