"""PGD ops (placeholder: reference only; the fused backends replace this)."""

from __future__ import annotations

import torch

from cbd_fast.reference import pgd_init_reference, pgd_step_reference


def pgd_step(x_adv, grad, x_clean, step_size, epsilon, *, lower=0.0, upper=1.0, backend=None):
    return pgd_step_reference(x_adv, grad, x_clean, step_size, epsilon, lower, upper)


def pgd_init(x_clean, epsilon, *, lower=0.0, upper=1.0, generator=None):
    return pgd_init_reference(x_clean, epsilon, lower, upper, generator)
