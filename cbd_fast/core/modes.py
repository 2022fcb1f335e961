"""Module modes, set for a block and restored exactly: the one eval-mode context of the package.

Every place that runs a model "for measurement" (the attack, clean anchors, metrics, reports,
diagnostics) goes through :func:`eval_mode`, so each submodule's own ``training`` flag (a BatchNorm
kept in eval inside a training model stays so) and, optionally, each parameter's ``requires_grad``
come back as they were, also when an exception escapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["eval_mode", "attack_mode", "is_batchnorm"]

M = TypeVar("M")


@contextlib.contextmanager
def eval_mode(module: M, *, freeze_params: bool = False) -> Iterator[M]:
    """Eval mode for every submodule of ``module`` inside the block; flags restored on exit.

    Args:
        module: an ``nn.Module`` (changed in place for the block, not copied); anything else (a plain
            callable) is yielded unchanged.
        freeze_params: also set ``requires_grad=False`` on every parameter for the block, so that
            ``torch.autograd.grad(loss, x)`` computes the input gradient alone.

    Yields:
        ``module`` itself.
    """
    if not isinstance(module, nn.Module):
        yield module
        return
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()] if freeze_params else []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        module.eval()
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


@contextlib.contextmanager
def attack_mode(encoder: nn.Module) -> Iterator[nn.Module]:
    """Put ``encoder`` in attack mode: eval mode everywhere and no parameter requiring grad.

    Inside the block the whole module tree is in eval mode (BatchNorm uses its running statistics
    and does not update them; dropout is off) and every parameter has ``requires_grad=False``, so
    ``torch.autograd.grad(loss, x)`` computes the input gradient alone. On exit, normal or by an
    exception, each submodule's ``training`` flag and each parameter's ``requires_grad`` are set
    back exactly as they were. Nesting is fine.

    Args:
        encoder: the module to attack (not copied; its flags are changed temporarily).

    Yields:
        ``encoder`` itself.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
        >>> with attack_mode(net):
        ...     assert not net.training and not net[0].weight.requires_grad
        >>> net.training, net[0].weight.requires_grad
        (True, True)
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module; got {type(encoder).__name__}")
    with eval_mode(encoder, freeze_params=True):
        yield encoder


_BN_NAMES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GlobalBatchNorm"})


def is_batchnorm(m: Any) -> bool:
    """A BatchNorm layer, also inside a TorchScript module (whose submodules keep only their name)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(m, torch.jit.ScriptModule) and getattr(m, "original_name", "") in _BN_NAMES
