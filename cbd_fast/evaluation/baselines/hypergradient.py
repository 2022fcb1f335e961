"""I-BAU: Zeng, Chen, Park, Mao, Jin & Jia, "Adversarial Unlearning of Backdoors via Implicit
Hypergradient", ICLR 2022 (code: github.com/YiZeng623/I-BAU, ``defense.py`` + ``hypergrad.py``).

The minimax ``min_theta max_delta (1/n) sum_i CE(f_theta(x_i + delta), y_i)`` over ONE universal
perturbation delta shared by all images, solved by rounds (``rounds``, paper code: 5):

1. Inner max (per round): delta starts at 0 and takes one SGD step (lr ``inner_lr`` = 10) per batch over
   ``inner_passes`` (1) pass(es) of the clean set on ``-CE(f(x + delta), f(x).argmax) + reg * ||delta||^2``
   (reg = 0.001; the code uses the model's own predictions as labels here), then is projected on the
   L2 ball of radius ``radius``.
2. Outer min: for every batch, one Adam step (lr ``lr`` = 0.001) on the model along the IMPLICIT
   HYPERGRADIENT of the outer loss ``CE(f_theta(x + patch), y)`` at delta* (the code patches delta onto a
   random ``portion`` = 1% of the batch, at least one image):

       d L_out / d theta = dL_out/dtheta + (d delta*/d theta)^T dL_out/ddelta
                         = dL_out/dtheta - (d^2 L_in / dtheta ddelta) H^{-1} dL_out/ddelta,

   H = d^2 L_in / ddelta^2, L_in(delta, theta) = -CE(f_theta(x + delta), y) + reg * ||delta||^2 (the
   inner problem written as a minimisation). The inverse-Hessian-vector product is approximated as in
   the paper's code (``hypergrad.fixed_point``, Grazzi et al., ICML 2020): delta* is a fixed point of
   the gradient-descent map Phi(delta) = delta - fp_step * dL_in/ddelta (fp_step 0.1), and
   v = sum_{k<K} (dPhi/ddelta)^T^k dL_out/ddelta (K = 5 fixed-point / truncated-Neumann iterations,
   i.e. fp_step * H^{-1} dL_out/ddelta truncated), then the implicit term is (dPhi/dtheta)^T v. Every
   product is a torch.autograd vector-Jacobian product through the network (double backward); no
   Hessian is formed. ``K = 0`` drops the implicit term: a plain alternating update (for ablation).

Deviations from the reference code: (a) the inner loss of the hypergradient uses the current batch
(the code always uses the first batch); (b) the L2 projection is applied after every inner step with
``radius`` = 5.0: the reference carries the line with radius 10 for 3x32x32 CIFAR images commented out,
10 * sqrt(784 / 3072) ~= 5 is the same per-pixel scale for 1x28x28, and it bounds every trigger used
here (the 3x3 BadNets patch has L2 norm <= 3); ``radius=None`` leaves delta unbounded as the code does;
(c) the batches are a seeded permutation of the defender's set, fixed for the whole run (the code's
loader is unshuffled). The model stays in eval mode throughout, as in the code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.baselines._common import (
    check_data,
    check_model,
    device_of,
    float_arg,
    info_arg,
    int_arg,
)

__all__ = ["i_bau", "implicit_hypergradient"]


def _grad_or_zeros(
    outputs: Sequence[torch.Tensor] | torch.Tensor,
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor] | None = None,
    *,
    retain_graph: bool = True,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    grads = torch.autograd.grad(
        outputs,
        inputs,
        grad_outputs=grad_outputs,
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def implicit_hypergradient(
    inner_loss: Callable[[list[torch.Tensor]], torch.Tensor],
    outer_loss: Callable[[list[torch.Tensor]], torch.Tensor],
    inner_vars: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    K: int = 5,
    fp_step: float = 0.1,
    tol: float = 1e-10,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hypergradient of ``outer_loss(w*(theta), theta)`` w.r.t. ``params`` at an inner optimum ``w*``.

    The fixed-point method of Grazzi et al. (ICML 2020) as used by I-BAU's ``hypergrad.fixed_point``:
    with Phi(w) = w - fp_step * d inner_loss / dw, ``v_{k+1} = (dPhi/dw)^T v_k + dL_out/dw`` from
    v_0 = 0 for K steps (or until ||v_{k+1} - v_k|| < tol), then the hypergradient is
    ``dL_out/dtheta + (dPhi/dtheta)^T v`` (v -> fp_step * H^{-1} dL_out/dw as K grows, H the inner Hessian,
    when ||I - fp_step * H|| < 1).

    Args:
        inner_loss: ``w -> scalar``, differentiable in w and in ``params`` (which it uses by closure).
        outer_loss: ``w -> scalar``, likewise.
        inner_vars: the inner solution w* (detached copies are used).
        params: the outer variables theta (leaf tensors requiring grad).
        K: fixed-point iterations (>= 0; 0: no implicit term).
        fp_step: step of the gradient-descent map (> 0).
        tol: early stop of the iterations.

    Returns:
        ``(hypergradient, direct)``: lists matching ``params``; ``direct`` is dL_out/dtheta alone, so the
        implicit term is their difference.
    """
    params = list(params)
    w = [v.detach().requires_grad_(True) for v in inner_vars]
    o_loss = outer_loss(w)
    g_w = _grad_or_zeros(o_loss, w)
    direct = _grad_or_zeros(o_loss, params, retain_graph=False)
    if K == 0:
        return [d.clone() for d in direct], direct
    grads_in = torch.autograd.grad(inner_loss(w), w, create_graph=True)
    w_mapped = [wi - fp_step * gi for wi, gi in zip(w, grads_in)]
    v = [torch.zeros_like(wi) for wi in w]
    for _ in range(K):
        v_prev = v
        v = _grad_or_zeros(w_mapped, w, grad_outputs=v)
        v = [a + b for a, b in zip(v, g_w)]
        if float(torch.cat([(a - b).flatten() for a, b in zip(v, v_prev)]).norm()) < tol:
            break
    implicit = _grad_or_zeros(w_mapped, params, grad_outputs=v, retain_graph=False)
    return [d + i for d, i in zip(direct, implicit)], direct


def i_bau(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    rounds: int = 5,
    K: int = 5,
    lr: float = 1e-3,
    batch_size: int = 100,
    inner_lr: float = 10.0,
    inner_passes: int = 1,
    reg: float = 1e-3,
    fp_step: float = 0.1,
    radius: float | None = 5.0,
    portion: float = 0.01,
    info: dict[str, Any] | None = None,
) -> nn.Module:
    """I-BAU (Zeng et al., ICLR 2022): adversarial unlearning of a universal perturbation with the
    implicit hypergradient (module docstring). Returns a new model.

    Args:
        model: a classifier images -> logits (any architecture; not modified).
        images: [N, C, H, W] float clean images, labels: [N] int64 (the defender's labeled set).
        seed: seed of the batch order and of the patched images.
        rounds: unlearning rounds (paper code 5). K: fixed-point iterations (5; 0 = plain alternating).
        lr: Adam learning rate of the model (code: 0.001). batch_size: 100 (code).
        inner_lr: SGD learning rate of the universal perturbation (10). inner_passes: passes over the
            set per round for it (1).
        reg: weight of ||delta||^2 in the inner loss (0.001). fp_step: step of the fixed-point map (0.1).
        radius: L2 bound of delta (> 0) or None (unbounded, as the code). portion: share of each batch
            that gets delta in the outer loss, in (0, 1] (code: 0.01; at least one image).
        info: optional dict, filled with ``delta_norm`` (per round), ``implicit_norm`` and
            ``direct_norm`` (mean norms of the two hypergradient terms over the outer steps).

    Returns:
        The unlearned deep copy, in eval mode.
    """
    check_model(model)
    check_data(images, labels)
    rounds = int_arg("rounds", rounds)
    K = int_arg("K", K, low=0)
    lr = float_arg("lr", lr, low=0.0, low_open=True)
    batch_size = int_arg("batch_size", batch_size)
    inner_lr = float_arg("inner_lr", inner_lr, low=0.0, low_open=True)
    inner_passes = int_arg("inner_passes", inner_passes)
    reg = float_arg("reg", reg, low=0.0)
    fp_step = float_arg("fp_step", fp_step, low=0.0, low_open=True)
    if radius is not None:
        radius = float_arg("radius", radius, low=0.0, low_open=True)
    portion = float_arg("portion", portion, low=0.0, high=1.0, low_open=True)
    seed = int_arg("seed", seed, low=0)
    out = info_arg(info)

    net = copy.deepcopy(model).eval()
    net.requires_grad_(True)
    params = [p for p in net.parameters()]
    device = device_of(net)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    batches = [perm[i : i + batch_size] for i in range(0, len(images), batch_size)]
    outer_opt = torch.optim.Adam(params, lr=lr)
    delta_norms: list[float] = []
    implicit_norms: list[float] = []
    direct_norms: list[float] = []

    def project(d: torch.Tensor) -> None:
        if radius is not None:
            n = float(d.norm())
            if n > radius:
                d.mul_(radius / n)

    for _ in range(rounds):
        # 1. inner max: one universal perturbation for the whole set
        delta = torch.zeros((1, *images.shape[1:]), device=device, requires_grad=True)
        delta_opt = torch.optim.SGD([delta], lr=inner_lr)
        for _ in range(inner_passes):
            for b in batches:
                x = images[b].to(device)
                with torch.no_grad():
                    pseudo = net(x).argmax(1)
                loss = -F.cross_entropy(net(x + delta), pseudo) + reg * delta.pow(2).sum()
                (grad,) = torch.autograd.grad(loss, [delta])
                delta.grad = grad
                delta_opt.step()
                with torch.no_grad():
                    project(delta)
        delta_star = delta.detach()
        delta_norms.append(float(delta_star.norm()))

        # 2. outer min with the implicit hypergradient
        for b in batches:
            x, y = images[b].to(device), labels[b].to(device)
            n_patch = max(1, math.floor(portion * len(b)))
            patched = torch.zeros(len(b), 1, 1, 1, device=device)
            patched[torch.randperm(len(b), generator=g)[:n_patch].to(device)] = 1.0

            def inner_loss(w: list[torch.Tensor], x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                return -F.cross_entropy(net(x + w[0]), y) + reg * w[0].pow(2).sum()

            def outer_loss(
                w: list[torch.Tensor],
                x: torch.Tensor = x,
                y: torch.Tensor = y,
                patched: torch.Tensor = patched,
            ) -> torch.Tensor:
                return F.cross_entropy(net(x + patched * w[0]), y)

            hyper, direct = implicit_hypergradient(
                inner_loss, outer_loss, [delta_star], params, K=K, fp_step=fp_step
            )
            total = torch.cat([h.flatten() for h in hyper])
            if not bool(torch.isfinite(total).all()):
                raise RuntimeError("i_bau: non-finite hypergradient (try a lower lr or fp_step)")
            d = torch.cat([t.flatten() for t in direct])
            direct_norms.append(float(d.norm()))
            implicit_norms.append(float((total - d).norm()))
            for p, h in zip(params, hyper):
                p.grad = h
            outer_opt.step()
            outer_opt.zero_grad(set_to_none=True)
    out.update(
        delta_norm=delta_norms,
        implicit_norm=sum(implicit_norms) / len(implicit_norms),
        direct_norm=sum(direct_norms) / len(direct_norms),
    )
    return net.eval()
