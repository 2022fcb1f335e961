"""Shared pieces of the label-using paper baselines: argument checks, the SGD loop, activation capture.

Nothing here is a defense by itself. Every check raises with the argument's name and value.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------ argument checks


def check_model(model: Any) -> nn.Module:
    """``model`` itself, or TypeError when it is not an ``nn.Module`` with at least one parameter."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (images -> logits); got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("model must have parameters; got a module without any")
    return model


def backbone_of(model: nn.Module) -> nn.Module:
    """``model.backbone`` (images -> features [B, D]), or TypeError naming what is missing."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(
            "model must be a classifier with a .backbone nn.Module (images -> features) and a .head; "
            f"{type(model).__name__} has no .backbone module"
        )
    return backbone


def check_data(images: Any, labels: Any) -> None:
    """The defender's labeled set: [N, C, H, W] float images and [N] int64 labels, N >= 2."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise TypeError(
            "images must be a float tensor [N, C, H, W]; got "
            f"{type(images).__name__} {getattr(images, 'shape', None)} {getattr(images, 'dtype', None)}"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        raise TypeError(
            "labels must be an int64 tensor [N]; got "
            f"{type(labels).__name__} {getattr(labels, 'shape', None)} {getattr(labels, 'dtype', None)}"
        )
    if len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length; got {len(images)} and {len(labels)}")
    if len(images) < 2:
        raise ValueError(f"images must hold at least 2 images; got {len(images)}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0; got min {int(labels.min())}")


def int_arg(name: str, value: Any, *, low: int = 1) -> int:
    """``value`` as an int >= ``low`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def float_arg(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval [low, high] (``low_open``/``high_open``: strict)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) < high if high_open else float(value) <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = (
            f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        )
        raise ValueError(f"{name} must be a finite number in {interval}; got {value!r}")
    return float(value)


def info_arg(info: Any) -> dict[str, Any]:
    """The caller's ``info`` dict (filled with diagnostics), or a throwaway dict for None."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise TypeError(f"info must be a dict (filled with diagnostics) or None; got {type(info).__name__}")
    return info


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------ training


def sgd_train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    generator: torch.Generator,
    schedule: str = "cosine",
    nesterov: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    what: str = "training",
) -> nn.Module:
    """Mini-batch SGD on every parameter of ``model`` in train mode, in place; returns it in eval mode.

    Each epoch draws a permutation from ``generator`` and walks it in batches of ``batch_size`` (a last
    batch of one image is skipped: BatchNorm cannot train on it).

    Args:
        model: images -> logits (trained in place).
        images, labels: the labeled set.
        epochs, lr, batch_size, momentum, weight_decay, nesterov: the optimiser.
        generator: CPU generator of the shuffling.
        schedule: ``"cosine"`` (cosine annealing per step to 0 over the run) or ``"step2"`` (``lr`` for
            the first 2 epochs, ``lr / 10`` afterwards: the NAD code's ``adjust_learning_rate``).
        loss_fn: ``(x, y) -> loss`` (default: cross-entropy of ``model(x)``).
        after_step: called after every optimiser step (e.g. to keep pruned weights at zero).
        what: name used in the error raised on a non-finite loss.

    Raises:
        RuntimeError: the loss became non-finite (names ``what``, the epoch and the batch).
    """
    device = device_of(model)
    model.requires_grad_(True)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    steps_per_epoch = math.ceil(len(images) / batch_size)
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    elif schedule != "step2":
        raise ValueError(f"schedule must be 'cosine' or 'step2'; got {schedule!r}")
    if loss_fn is None:

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x), y)

    model.train()
    for epoch in range(epochs):
        if schedule == "step2":
            for group in opt.param_groups:
                group["lr"] = lr if epoch < 2 else lr / 10
        perm = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            b = perm[i : i + batch_size]
            if len(b) < 2:
                continue
            x, y = images[b].to(device), labels[b].to(device)
            loss = loss_fn(x, y)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"{what}: non-finite loss {loss.item()} at epoch {epoch + 1}, "
                    f"batch {i // batch_size + 1} (try a lower lr)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if after_step is not None:
                after_step()
    return model.eval()


# ------------------------------------------------------------------ activations


@contextlib.contextmanager
def capture(modules: dict[str, nn.Module], *, inputs: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record each module's output (``inputs``: its first input) at every forward, by name, in the block."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        if inputs:

            def pre(_m: nn.Module, args: tuple, _name: str = name) -> None:
                store[_name] = args[0]

            handles.append(module.register_forward_pre_hook(pre))
        else:

            def post(_m: nn.Module, _args: tuple, out: Any, _name: str = name) -> None:
                store[_name] = out

            handles.append(module.register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def trace_leaves(model: nn.Module, x: torch.Tensor) -> tuple[list[nn.Module], dict[int, list[nn.Module]]]:
    """The data flow between ``model``'s leaf modules on one eval-mode forward of ``x``.

    Returns:
        ``(order, consumers)``: the leaf modules in the order they ran, and ``id(module) -> the leaf
        modules that received its output tensor`` (the same tensor object, so ``bn(conv(x))`` links conv
        to bn whatever the registration order; functional ops in between break the link).
    """
    order: list[nn.Module] = []
    consumers: dict[int, list[nn.Module]] = {}
    producer: dict[int, nn.Module] = {}
    keep: list[torch.Tensor] = []  # holds every output so that tensor ids stay unique

    def hook(m: nn.Module, args: tuple, out: Any) -> None:
        order.append(m)
        for a in args:
            if isinstance(a, torch.Tensor) and id(a) in producer:
                src = consumers.setdefault(id(producer[id(a)]), [])
                if m not in src:
                    src.append(m)
        if isinstance(out, torch.Tensor):
            keep.append(out)
            producer[id(out)] = m

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return order, consumers


def module_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> its dotted name in model`` (the root is ``""``)."""
    return {id(m): n for n, m in model.named_modules()}


def module_by_name(model: nn.Module, name: str, what: str) -> nn.Module:
    """``model``'s submodule ``name`` (as in ``named_modules``), or ValueError naming ``what``."""
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or name == "":
        sample = ", ".join(n for n in list(modules)[1:12])
        raise ValueError(f"{what} must name a submodule of the model (e.g. {sample}, ...); got {name!r}")
    return modules[name]


def heldout_split(n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``(fit_index, heldout_index)`` split of ``range(n)`` with ``round(fraction * n)`` held out
    (at least 1 and at most n - 1)."""
    perm = torch.randperm(n, generator=generator)
    k = min(n - 1, max(1, round(fraction * n)))
    return perm[k:], perm[:k]
