"""Adversarial Neuron Pruning (ANP): Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021 (code: github.com/csdongxian/ANP_backdoor).

The paper's defense: each neuron k (a BatchNorm channel in the paper) gets a mask m_k in [0, 1] that
scales its weight, and adversarial multiplicative perturbations (delta_k on the weight, xi_k on the
bias, both in [-eps, eps]): a BN channel computes ``(m_k + delta_k) * gamma_k * xhat + (1 + xi_k) * beta_k``.
The masks minimise, on the clean set,

    alpha * CE(f(x; m)) + (1 - alpha) * max_{|delta|, |xi| <= eps} CE(f(x; m, delta, xi))

(trade-off alpha = 0.2, eps = 0.4): per batch, the perturbation is drawn uniformly in [-eps, eps] and
takes ``noise_steps`` (1) signed-gradient ascent steps of size eps / steps; then one SGD step (lr 0.2,
momentum 0.9) on the masks, which are clipped to [0, 1]. 2,000 iterations of batches of 128 drawn with
replacement (``optimize_mask_cifar.py``), the model in train mode. Then every neuron whose mask is
<= ``threshold`` (0.2, the code's ``--pruning-by threshold``) is pruned: its weight (BN gamma) is set
to 0 in the ORIGINAL model (``prune_neuron_cifar.py``; the bias is kept, as there).

Generic neurons (``anp_neurons``): the channels of EVERY normalisation layer with an affine weight
(BatchNorm1d/2d/3d, GroupNorm, InstanceNorm, 1-D LayerNorm: for the ViT the E features of each
LayerNorm), plus the output units of every Conv2d / Linear of ``model.backbone`` that is NOT directly
followed by such a norm over its channels (its units have no norm layer to carry the mask: the MLP's
Linear layers, FMNISTNet's Linear 576 -> 128, the ViT's patch embedding, qkv / projection / MLP
layers); a conv or linear whose output goes straight into its norm (traced on one forward, whatever
the registration order) is masked at the norm only, as in the paper. The
classifier head is never masked (nor is it in the paper). The masks and perturbations act through
forward hooks, ``y' = c_w * (y - b) + c_b * b`` on the layer's output y and bias b (exactly the paper's
``(m + delta) * weight``, ``(1 + xi) * bias``; for a conv / linear: its filter / weight row), so no
layer is replaced.

Deviation: the perturbations are clipped to [-eps, eps] after the ascent step (the paper's constraint;
the reference code leaves one step of eps past the random start unclipped).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.baselines._common import (
    backbone_of,
    check_data,
    check_model,
    device_of,
    float_arg,
    info_arg,
    int_arg,
    trace_leaves,
)

__all__ = ["anp", "anp_neurons", "prune_neurons"]

_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def _channel_axis(m: nn.Module) -> int:
    return -1 if isinstance(m, (nn.LayerNorm, nn.Linear)) else 1


def anp_neurons(model: nn.Module, probe: torch.Tensor) -> dict[str, nn.Module]:
    """``{name: layer}`` whose output channels ANP masks (module docstring): every affine normalisation
    layer of ``model``, and every Conv2d / Linear of ``model.backbone`` whose output does not go straight
    (traced on one forward of the images ``probe``) into a norm layer over its channels."""
    backbone = backbone_of(model)
    norms: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
                raise ValueError(
                    f"anp: LayerNorm {name!r} normalises over {tuple(m.normalized_shape)}; only 1-D "
                    "LayerNorms (features on the last axis) are supported"
                )
            norms[name] = m
    _, consumers = trace_leaves(model, probe)

    def normed(m: nn.Module) -> bool:
        nxt = consumers.get(id(m), [])
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        return len(nxt) == 1 and any(nxt[0] is n for n in norms.values()) and nxt[0].weight.shape[0] == width

    inside = {id(x) for x in backbone.modules()}
    units: dict[str, nn.Module] = {}
    for name, m in model.named_modules():  # model order
        if name in norms or isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) in inside and not normed(m):
            units[name] = m
    if not units:
        raise ValueError(
            "anp: the model has no affine normalisation layer and no Conv2d/Linear in its backbone"
        )
    return units


class _Perturbation:
    """Per-neuron masks and multiplicative perturbations applied by forward hooks (see module doc)."""

    def __init__(self, units: dict[str, nn.Module]) -> None:
        self.units = units
        self.perturbed = False
        self.mask: dict[str, torch.Tensor] = {}
        self.noise_w: dict[str, torch.Tensor] = {}
        self.noise_b: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, m in units.items():
            c = m.weight.shape[0]
            kw = dict(device=m.weight.device, dtype=m.weight.dtype)
            self.mask[name] = torch.ones(c, **kw, requires_grad=True)
            self.noise_w[name] = torch.zeros(c, **kw, requires_grad=True)
            self.noise_b[name] = torch.zeros(c, **kw, requires_grad=True)
            self.handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(m: nn.Module, _args: tuple, y: torch.Tensor) -> torch.Tensor:
            shape = [1] * y.dim()
            shape[_channel_axis(m)] = -1
            cw = self.mask[name] + self.noise_w[name] if self.perturbed else self.mask[name]
            bias = getattr(m, "bias", None)
            if bias is None:
                return y * cw.view(shape)
            b = bias.view(shape)
            cb = 1.0 + self.noise_b[name] if self.perturbed else torch.ones_like(self.noise_b[name])
            return cw.view(shape) * (y - b) + cb.view(shape) * b

        return hook

    def noises(self) -> list[torch.Tensor]:
        return [*self.noise_w.values(), *self.noise_b.values()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def prune_neurons(
    model: nn.Module, masks: dict[str, torch.Tensor | list[float]], threshold: float
) -> tuple[nn.Module, dict[str, list[int]]]:
    """A deep copy of ``model`` with the weight of every neuron whose mask is <= ``threshold`` set to 0.

    Args:
        model: the ORIGINAL model (not modified).
        masks: ``{layer name: [C] mask values}`` (``anp``'s ``info["masks"]``).
        threshold: in [0, 1].

    Returns:
        ``(pruned copy in eval mode, {layer name: pruned channel indices})``.
    """
    threshold = float_arg("threshold", threshold, low=0.0, high=1.0)
    out = copy.deepcopy(model).eval()
    modules = dict(out.named_modules())
    pruned: dict[str, list[int]] = {}
    for name, values in masks.items():
        if name not in modules or getattr(modules[name], "weight", None) is None:
            raise ValueError(f"masks names a layer the model lacks (or without weight): {name!r}")
        w = modules[name].weight
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape != (w.shape[0],):
            raise ValueError(f"masks[{name!r}] must have shape ({w.shape[0]},); got {tuple(values.shape)}")
        idx = (values <= threshold).nonzero().flatten()
        if idx.numel():
            w.index_fill_(0, idx.to(w.device), 0.0)
            pruned[name] = idx.tolist()
    return out, pruned


def anp(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    eps: float = 0.4,
    alpha: float = 0.2,
    threshold: float = 0.2,
    iterations: int = 2000,
    mask_lr: float = 0.2,
    batch_size: int = 128,
    noise_steps: int = 1,
    info: dict[str, Any] | None = None,
) -> nn.Module:
    """Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021): learn neuron masks, prune those <= threshold.

    Args:
        model: a classifier images -> logits (not modified); see ``anp_neurons`` for the neurons.
        images: [N, C, H, W] float clean images, labels: [N] int64 (the defender's labeled set).
        seed: seed of the batch draws and of the perturbations' random starts.
        eps: perturbation budget in [0, 1) (paper 0.4); 0 optimises the masks on clean loss alone.
        alpha: trade-off in [0, 1] (paper 0.2): weight of the clean loss, 1 - alpha of the perturbed one.
        threshold: neurons with mask <= threshold are pruned, in [0, 1] (paper 0.2).
        iterations: mask updates (paper 2,000; ~0.1 s each for FMNISTNet on one CPU thread).
        mask_lr: SGD learning rate of the masks (0.2, momentum 0.9).
        batch_size: images per iteration, drawn with replacement (128).
        noise_steps: ascent steps of the perturbation per iteration (1).
        info: optional dict, filled with ``masks`` ({layer: list of mask values}), ``pruned``
            ({layer: channel indices}), ``n_pruned`` and ``n_neurons``.

    Returns:
        The pruned deep copy of ``model`` (eval mode).
    """
    check_model(model)
    check_data(images, labels)
    eps = float_arg("eps", eps, low=0.0, high=1.0, high_open=True)
    alpha = float_arg("alpha", alpha, low=0.0, high=1.0)
    threshold = float_arg("threshold", threshold, low=0.0, high=1.0)
    iterations = int_arg("iterations", iterations)
    mask_lr = float_arg("mask_lr", mask_lr, low=0.0, low_open=True)
    batch_size = int_arg("batch_size", batch_size, low=2)
    noise_steps = int_arg("noise_steps", noise_steps)
    seed = int_arg("seed", seed, low=0)
    out = info_arg(info)

    work = copy.deepcopy(model)
    work.requires_grad_(False)
    units = anp_neurons(work, images[:2].to(device_of(work)))
    pert = _Perturbation(units)
    device = device_of(work)
    g = torch.Generator().manual_seed(seed)
    mask_opt = torch.optim.SGD(list(pert.mask.values()), lr=mask_lr, momentum=0.9)
    noise = pert.noises()
    work.train()
    try:
        for it in range(iterations):
            idx = torch.randint(len(images), (batch_size,), generator=g)
            x, y = images[idx].to(device), labels[idx].to(device)
            if eps > 0:
                with torch.no_grad():
                    for t in noise:
                        t.copy_((torch.rand(t.shape, generator=g) * 2 - 1).mul_(eps))
                for _ in range(noise_steps):
                    pert.perturbed = True
                    grads = torch.autograd.grad(-F.cross_entropy(work(x), y), noise, allow_unused=True)
                    with torch.no_grad():
                        for t, gr in zip(noise, grads):
                            if gr is not None:
                                t.sub_(gr.sign(), alpha=eps / noise_steps).clamp_(-eps, eps)
            loss_rob = torch.zeros((), device=device)
            if eps > 0:
                pert.perturbed = True
                loss_rob = F.cross_entropy(work(x), y)
            pert.perturbed = False
            loss_nat = F.cross_entropy(work(x), y)
            loss = alpha * loss_nat + (1 - alpha) * loss_rob
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"anp: non-finite loss {loss.item()} at iteration {it + 1} (try a lower mask_lr)"
                )
            mask_opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_opt.step()
            with torch.no_grad():
                for m in pert.mask.values():
                    m.clamp_(0.0, 1.0)
    finally:
        pert.remove()
    masks = {name: m.detach().cpu() for name, m in pert.mask.items()}
    pruned_model, pruned = prune_neurons(model, masks, threshold)
    n_pruned = sum(len(v) for v in pruned.values())
    if n_pruned == 0:
        lowest = min(float(m.min()) for m in masks.values())
        warnings.warn(
            f"anp pruned no neuron: the lowest mask value is {lowest:.3f} > threshold={threshold}",
            RuntimeWarning,
            stacklevel=2,
        )
    out.update(
        masks={k: v.tolist() for k, v in masks.items()},
        pruned=pruned,
        n_pruned=n_pruned,
        n_neurons=sum(int(v.numel()) for v in masks.values()),
    )
    return pruned_model
