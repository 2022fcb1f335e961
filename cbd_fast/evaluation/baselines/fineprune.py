"""Fine-Pruning: Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018 (LNCS 11050).

The paper's defense: (1) run clean validation images through the network and rank the channels
("neurons") of the LAST convolutional layer by their mean activation; (2) prune them in increasing order
of activation, i.e. dormant channels first (backdoor behaviour tends to hide in neurons clean inputs
leave dormant), stopping when the clean validation accuracy has dropped by a set amount (the paper uses
4%); (3) fine-tune the pruned network on the clean data (pruned channels stay removed).

Here, generically for any architecture:

- The pruned unit: the last ``nn.Conv2d`` of ``model.backbone`` to run whose output goes (traced on
  one forward: the same tensor, whatever the registration order) to a channel norm (BatchNorm2d /
  GroupNorm / InstanceNorm2d over its channels) and/or an activation module that maps 0 to 0 (ReLU,
  GELU, SiLU, ...). A channel is pruned by zeroing the norm's affine weight and bias for it (the
  norm's output, hence the activation's, is then exactly 0, also in train mode), or the conv's filter
  and bias when there is no norm. Activations are read at the end of that conv -> norm -> activation
  chain (post-ReLU, as in the paper). FMNISTNet: its third conv (64 channels, after BN + ReLU);
  bn_gap_cnn / groupnorm_cnn: the last conv (D channels); resnet8: the 1x1 conv to D.
- Fallback for models with no such conv (MLP; a ViT, whose only conv is the patch embedding, its output
  reshaped into tokens): the input units of the last ``nn.Linear`` of the backbone to run (MLP: the
  last hidden layer's post-ReLU units; tiny_vit: the pooled, LayerNorm'ed token features entering the
  projection), pruned by zeroing the Linear's input columns; with no Linear in the backbone either,
  the input units of ``model.head`` (the features). ``layer=NAME`` forces a Conv2d or Linear.
- Ranking statistic: the mean of |activation| over images and positions (equal to the paper's mean
  activation for post-ReLU units; the absolute value makes it meaningful for signed units).
- Stopping rule (paper: 4%): the defender's labeled set is split; ``holdout`` (20%) of it measures the
  clean accuracy. Channels are pruned one at a time in increasing activation; the pruning stops BEFORE
  the first channel whose removal puts the held-out accuracy more than ``acc_drop`` (0.04, absolute)
  below the unpruned model's, and never removes the last channel. Ranking uses the other 80%.
- Fine-tuning: the ``fine_tuning`` recipe (SGD 0.01, momentum 0.9, weight decay 5e-4, cosine, 10 epochs)
  on ALL the defender's images (the held-out part only served the stopping rule, which is decided
  before), the pruned weights set back to zero after every step.

Deviations: pruning is a mask (zeroed weights), not a smaller layer, so the returned model keeps its
architecture and state_dict keys; a pruned channel inside a residual block is silenced at its branch,
the skip connection may still carry it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cbd_fast.evaluation.baselines._common import (
    backbone_of,
    check_data,
    check_model,
    device_of,
    float_arg,
    heldout_split,
    info_arg,
    int_arg,
    module_by_name,
    module_names,
    sgd_train,
    trace_leaves,
)
from cbd_fast.evaluation.metrics import accuracy

__all__ = ["fine_pruning", "prune_site"]

#: activation modules with f(0) = 0: a zeroed pre-activation stays zero after them.
_ZERO_PRESERVING = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Hardswish,
    nn.Mish,
    nn.Hardtanh,
)
_CHANNEL_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


@dataclass
class PruneSite:
    """Where Fine-Pruning acts: the channels, where they are read, and the weights that silence them.

    Attributes:
        kind: ``"conv"`` (output channels of a conv unit), ``"linear_input"`` (input units of the last
            backbone Linear) or ``"head_input"`` (the features entering ``model.head``).
        description: human-readable, with module names.
        probe: the module whose output (``read_input`` False) or first input (True) holds the activations.
        read_input: see ``probe``.
        channel_dim: the channel axis of the probed tensor (1 for conv maps, -1 for linear inputs).
        channels: the number of prunable channels.
        slices: ``(parameter, dim)`` pairs: zeroing ``parameter`` at index c along ``dim`` silences c.
    """

    kind: str
    description: str
    probe: nn.Module
    read_input: bool
    channel_dim: int
    channels: int
    slices: list[tuple[nn.Parameter, int]] = field(default_factory=list)

    @torch.no_grad()
    def zero(self, channels: torch.Tensor | list[int]) -> None:
        """Zero the weights of ``channels`` (in place)."""
        idx = torch.as_tensor(channels, dtype=torch.long)
        if idx.numel() == 0:
            return
        for p, dim in self.slices:
            p.index_fill_(dim, idx.to(p.device), 0.0)


def _norm_channels(m: nn.Module) -> int:
    return int(m.num_features if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) else m.num_channels)


def _only(consumers: dict[int, list[nn.Module]], m: nn.Module) -> nn.Module | None:
    nxt = consumers.get(id(m), [])
    return nxt[0] if len(nxt) == 1 else None


def _conv_site(
    model: nn.Module, probe: torch.Tensor, convs: list[nn.Conv2d], *, require_unit: bool = True
) -> PruneSite | None:
    """The last conv of ``convs`` (in execution order) whose output feeds, alone, a channel norm and/or
    a zero-preserving activation (traced on ``probe``); with ``require_unit`` False the last conv is
    taken bare when it has neither."""
    names = module_names(model)
    order, consumers = trace_leaves(model, probe)
    ran = {id(m): i for i, m in enumerate(order)}
    for conv in sorted((c for c in convs if id(c) in ran), key=lambda c: ran[id(c)], reverse=True):
        norm = act = None
        nxt = _only(consumers, conv)
        if isinstance(nxt, _CHANNEL_NORMS) and _norm_channels(nxt) == conv.out_channels:
            norm = nxt
            nxt = _only(consumers, norm)
        if isinstance(nxt, _ZERO_PRESERVING):
            act = nxt
        if norm is None and act is None and require_unit:
            continue  # e.g. a ViT patch embedding: not a conv -> norm/activation unit
        chain = [m for m in (conv, norm, act) if m is not None]
        if norm is not None:
            if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
                raise ValueError(
                    f"fine_pruning: the norm layer {names[id(norm)]!r} after conv {names[id(conv)]!r} has no "
                    "affine weight and bias to zero; pass layer=<name of another Conv2d or Linear>"
                )
            slices = [(norm.weight, 0), (norm.bias, 0)]
        else:
            slices = [(conv.weight, 0)] + ([(conv.bias, 0)] if conv.bias is not None else [])
        desc = " -> ".join(f"{names[id(m)]} ({type(m).__name__})" for m in chain)
        return PruneSite("conv", desc, chain[-1], False, 1, conv.out_channels, slices)
    return None


def prune_site(model: nn.Module, probe: torch.Tensor, layer: str | None = None) -> PruneSite:
    """The channels Fine-Pruning ranks and prunes in ``model`` (see the module docstring for the rule).

    Args:
        model: a classifier with ``.backbone`` and ``.head``.
        probe: a few images [B, C, H, W] (one forward traces which layer feeds which).
        layer: optional name (as in ``model.named_modules()``) of a Conv2d (its output channels, with
            the norm / activation that take them) or a Linear (its input units) to prune instead of
            the automatic choice.
    """
    backbone = backbone_of(model)
    names = module_names(model)
    if layer is not None:
        m = module_by_name(model, layer, "layer")
        if isinstance(m, nn.Conv2d):
            site = _conv_site(model, probe, [m], require_unit=False)
            if site is None:
                raise ValueError(f"layer {layer!r} did not run on a forward of the model")
            return site
        if isinstance(m, nn.Linear):
            return PruneSite(
                "linear_input", f"input of {layer} (Linear)", m, True, -1, m.in_features, [(m.weight, 1)]
            )
        raise ValueError(f"layer must name a Conv2d or a Linear; {layer!r} is a {type(m).__name__}")
    site = _conv_site(model, probe, [m for m in backbone.modules() if isinstance(m, nn.Conv2d)])
    if site is not None:
        return site
    order_linear = [m for m in trace_leaves(model, probe)[0] if isinstance(m, nn.Linear)]
    inside = {id(x) for x in backbone.modules()}
    linears = [m for m in order_linear if id(m) in inside]
    if linears:
        lin = linears[-1]
        return PruneSite(
            "linear_input",
            f"input of {names[id(lin)]} (Linear)",
            lin,
            True,
            -1,
            lin.in_features,
            [(lin.weight, 1)],
        )
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return PruneSite(
            "head_input",
            "input of head (Linear): the features",
            head,
            True,
            -1,
            head.in_features,
            [(head.weight, 1)],
        )
    raise ValueError(
        "fine_pruning: the model has no Conv2d unit, no Linear in its backbone and no Linear head to prune; "
        "pass layer=<name of a Conv2d or Linear>"
    )


@torch.no_grad()
def _mean_activation(
    model: nn.Module, site: PruneSite, images: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """[channels] mean |activation| of the site's channels over ``images`` (model in eval mode)."""
    total = torch.zeros(site.channels, dtype=torch.float64)
    count = [0]  # values per channel seen so far

    def reduce(t: torch.Tensor) -> None:
        t = t.detach().abs().movedim(site.channel_dim, 0).reshape(site.channels, -1)
        total.add_(t.double().sum(1).cpu())
        count[0] += t.shape[1]

    def hook_out(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
        reduce(out)

    def hook_in(_m: nn.Module, args: tuple) -> None:
        reduce(args[0])

    handle = (
        site.probe.register_forward_pre_hook(hook_in)
        if site.read_input
        else site.probe.register_forward_hook(hook_out)
    )
    was = model.training
    model.eval()
    device = device_of(model)
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size].to(device))
    finally:
        handle.remove()
        model.train(was)
    return (total / max(count[0], 1)).float()


@torch.no_grad()
def _check_silenced(model: nn.Module, site: PruneSite, images: torch.Tensor, pruned: torch.Tensor) -> None:
    """RuntimeError unless the pruned conv channels read exactly 0 at the probe (e.g. a sigmoid after)."""
    if site.read_input or pruned.numel() == 0:
        return
    seen: list[torch.Tensor] = []
    handle = site.probe.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    was = model.training
    model.eval()
    try:
        model(images[:8].to(device_of(model)))
    finally:
        handle.remove()
        model.train(was)
    worst = seen[0].movedim(site.channel_dim, 0)[pruned.to(seen[0].device)].abs().max().item()
    if worst > 1e-6:
        raise RuntimeError(
            f"fine_pruning: zeroing the weights of {site.description} did not silence the pruned channels "
            f"(|activation| up to {worst:.3g}); pass layer=<another Conv2d or Linear>"
        )


def fine_pruning(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    acc_drop: float = 0.04,
    holdout: float = 0.2,
    layer: str | None = None,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    info: dict[str, Any] | None = None,
) -> nn.Module:
    """Fine-Pruning (Liu et al., RAID 2018): prune dormant last-layer channels, then fine-tune (a new model).

    Args:
        model: a classifier with ``.backbone`` (images -> features) and ``.head`` (not modified).
        images: [N, C, H, W] float clean images, labels: [N] int64 (the defender's labeled set).
        seed: seed of the held-out split and of the fine-tuning shuffles.
        acc_drop: the stopping rule: largest tolerated drop of held-out accuracy, absolute fraction in
            [0, 1] (paper: 0.04). 0 prunes only while accuracy does not fall at all.
        holdout: share of the set held out for the stopping rule, in (0, 1).
        layer: optional Conv2d / Linear name forcing the pruned unit (see ``prune_site``).
        epochs, lr, batch_size, momentum, weight_decay: the fine-tuning (``fine_tuning``'s recipe);
            ``epochs=0`` returns the pruned model without fine-tuning (the paper's "pruning" defense).
        info: optional dict, filled with ``layer`` (description), ``kind``, ``channels``, ``pruned``
            (channel indices in pruning order), ``activation`` (per-channel means), ``acc_base`` and
            ``acc_pruned`` (held-out accuracy before / after pruning, before fine-tuning).

    Returns:
        The pruned and fine-tuned deep copy, in eval mode; the pruned channels' weights are exactly 0.

    Raises:
        ValueError / TypeError: a bad argument, or a model with nothing to prune (the message says why).
    """
    check_model(model)
    check_data(images, labels)
    acc_drop = float_arg("acc_drop", acc_drop, low=0.0, high=1.0)
    holdout = float_arg("holdout", holdout, low=0.0, high=1.0, low_open=True, high_open=True)
    epochs = int_arg("epochs", epochs, low=0)
    lr = float_arg("lr", lr, low=0.0, low_open=True)
    batch_size = int_arg("batch_size", batch_size)
    momentum = float_arg("momentum", momentum, low=0.0, high=1.0, high_open=True)
    weight_decay = float_arg("weight_decay", weight_decay, low=0.0)
    seed = int_arg("seed", seed, low=0)
    if layer is not None and not isinstance(layer, str):
        raise ValueError(f"layer must be a module name (str) or None; got {layer!r}")
    out = info_arg(info)

    net = copy.deepcopy(model).eval()
    site = prune_site(net, images[:2].to(device_of(net)), layer)
    g = torch.Generator().manual_seed(seed)
    fit, held = heldout_split(len(images), holdout, g)
    x_held, y_held = images[held], labels[held]
    activation = _mean_activation(net, site, images[fit])
    order = torch.sort(activation, stable=True).indices  # least active first

    acc_base = accuracy(net, x_held, y_held)
    acc_now = acc_base
    n_pruned = 0
    for k in range(site.channels - 1):  # never the last channel
        saved = [
            (p, dim, p.detach().index_select(dim, order[k : k + 1].to(p.device)).clone())
            for p, dim in site.slices
        ]
        site.zero(order[k : k + 1])
        acc_k = accuracy(net, x_held, y_held)
        if acc_base - acc_k > acc_drop:
            with torch.no_grad():  # undo: this channel stays
                for p, dim, value in saved:
                    p.index_copy_(dim, order[k : k + 1].to(p.device), value)
            break
        n_pruned, acc_now = k + 1, acc_k
    pruned = order[:n_pruned]
    _check_silenced(net, site, images, pruned)
    if n_pruned == 0:
        warnings.warn(
            f"fine_pruning pruned no channel of {site.description}: removing the least active one already "
            f"dropped held-out accuracy by more than acc_drop={acc_drop}; only the fine-tuning acts",
            RuntimeWarning,
            stacklevel=2,
        )
    if epochs > 0:
        sgd_train(
            net,
            images,
            labels,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            momentum=momentum,
            weight_decay=weight_decay,
            generator=g,
            after_step=lambda: site.zero(pruned),
            what="fine_pruning fine-tuning",
        )
    out.update(
        layer=site.description,
        kind=site.kind,
        channels=site.channels,
        pruned=pruned.tolist(),
        activation=activation.tolist(),
        acc_base=acc_base,
        acc_pruned=acc_now,
    )
    return net.eval()
