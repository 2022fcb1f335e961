"""The paper's adversary (per-sample contrastive PGD) and the no-attack baseline."""

from __future__ import annotations

import torch

from cbd_fast.core.adversaries.base import Adversary, AttackInputs, register_adversary
from cbd_fast.core.attack import contrastive_pgd
from cbd_fast.core.rng import per_sample_uniform, random_start

__all__ = ["ContrastivePGD", "NoAdversary"]


@register_adversary("pgd")
class ContrastivePGD(Adversary):
    """The paper's attack: uniform random start in the eps-ball (per sample), then K steps of signed
    gradient ascent on NT-Xent(f(x_adv), clean anchors) via ``cbd_fast.core.attack.contrastive_pgd``
    (input-only gradients, BatchNorm/dropout in eval mode)."""

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        cfg = self.config
        x_init = None
        if cfg.epsilon > 0:
            u = per_sample_uniform(inp.indices, inp.x.shape[1:], seed=cfg.seed, epoch=inp.epoch)
            x_init = random_start(inp.x, u, cfg.epsilon)
        if cfg.steps == 0 or cfg.epsilon == 0 or cfg.step_size == 0:
            return (inp.x if x_init is None else x_init).detach()
        kwargs = {} if inp.gather is None else {"gather": inp.gather}
        return contrastive_pgd(
            inp.encoder,
            inp.x,
            inp.clean_features,
            epsilon=cfg.epsilon,
            step_size=cfg.step_size,
            steps=cfg.steps,
            temperature=cfg.temperature,
            random_start=True,
            backend=cfg.backend,
            x_init=x_init,
            **kwargs,
        )


@register_adversary("none")
class NoAdversary(Adversary):
    """x_adv = x: CBD's loss without an attack, i.e. plain contrastive fine-tuning (a baseline)."""

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        return inp.x.detach()
