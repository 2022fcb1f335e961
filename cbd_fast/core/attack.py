"""Contrastive PGD: CBD step 2, the label-free adversary that evokes a backdoor.

``contrastive_pgd`` maximises ``nt_xent(features(x_adv), clean_features)`` over the L-inf ball of
radius epsilon around the images (and the box [lower, upper]) with K signed-gradient steps.
Only the input gradient is computed: every parameter's ``requires_grad`` is switched off for the
attack, so autograd neither writes ``.grad`` nor spends time on weight gradients (for a conv net
that is roughly a third of the backward pass). BatchNorm and dropout run in eval mode during the
attack (``attack_mode``), and everything is restored afterwards, also when an exception escapes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import nn

from cbd_fast.core.features import FeatureFn, encoder_features
from cbd_fast.core.modes import attack_mode
from cbd_fast.ops.nt_xent import nt_xent
from cbd_fast.ops.pgd import _is_dense, _same_layout, pgd_init, pgd_step

__all__ = ["attack_mode", "contrastive_pgd"]


def _check_nonneg(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0; got {value}")
    return value


def contrastive_pgd(
    encoder: nn.Module,
    x: torch.Tensor,
    clean_features: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    temperature: float,
    random_start: bool = True,
    backend: str | None = None,
    x_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    feature_fn: FeatureFn | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lower: float = 0.0,
    upper: float = 1.0,
) -> torch.Tensor:
    """Adversarial images that push the encoder's features away from the clean features (CBD step 2).

    Starting from ``x_init``, or a uniform random point of the ball (``random_start``), or ``x``,
    runs ``steps`` times: ``loss = nt_xent(features(x_adv), clean_features, temperature)``,
    ``g = d loss / d x_adv`` (input gradient only), ``x_adv <- pgd_step(x_adv, g, x, step_size,
    epsilon, lower, upper)``. The encoder runs in ``attack_mode`` (eval mode, no parameter
    gradients); its flags are restored afterwards. Autocast set by the caller applies to the
    forward passes; ``x_adv`` keeps ``x``'s dtype and memory format.

    Args:
        encoder: the backbone, ``encoder(x) -> features`` (any shape [B, ...], flattened to [B, D]).
        x: [B, ...] clean images, float dtype, values in [lower, upper] (not checked: a device
            sync). Not modified.
        clean_features: [B, D] (or [B, ...]) anchors, usually ``encoder(x)`` computed without
            gradient; treated as constants. With ``gather`` they are the global batch [B_global, D].
        epsilon: L-inf radius >= 0 (CBD: 8/255).
        step_size: ascent step alpha >= 0 (CBD: 2/255).
        steps: number of PGD steps K >= 0 (0 returns the start point).
        temperature: NT-Xent temperature tau > 0 (CBD: 0.5).
        random_start: start from ``pgd_init(x, epsilon)`` instead of ``x`` (ignored with ``x_init``).
        backend: backend for the ``nt_xent`` and ``pgd_step`` ops (None: automatic).
        x_init: optional start point, same shape/dtype/device as ``x`` (e.g. per-sample random starts
            drawn by the caller); projected on the ball and the box before the first step.
        generator: ``torch.Generator`` for the random start (reproducible attacks).
        feature_fn: optional ``(encoder, x) -> [B, D]`` used instead of ``encoder(x)``.
        gather: optional ``[B, D] -> [B_global, D]`` applied to the adversarial features each step
            (distributed training: all-gather keeping the local gradient path).
        lower, upper: the box the images live in (default [0, 1]).

    Returns:
        ``x_adv``: a new tensor like ``x`` (detached, ``requires_grad=False``).

    Raises:
        TypeError / ValueError: bad arguments, naming the argument and the value.

    Example:
        >>> enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
        >>> x = torch.rand(4, 3, 2, 2)
        >>> with torch.no_grad():
        ...     c = enc(x)
        >>> x_adv = contrastive_pgd(enc, x, c, epsilon=8 / 255, step_size=2 / 255, steps=3,
        ...                         temperature=0.5)
        >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6)
        True
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module; got {type(encoder).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a float tensor; got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a non-empty batch [B, ...]; got shape {tuple(x.shape)}")
    if not isinstance(clean_features, torch.Tensor) or not clean_features.is_floating_point():
        raise TypeError(
            "clean_features must be a float tensor; got "
            f"{getattr(clean_features, 'dtype', type(clean_features).__name__)}"
        )
    if clean_features.dim() < 1:
        raise ValueError(f"clean_features must be [B, D]; got shape {tuple(clean_features.shape)}")
    if gather is None and clean_features.shape[0] != x.shape[0]:
        raise ValueError(
            f"clean_features must have x's batch size {x.shape[0]}; got shape {tuple(clean_features.shape)}"
        )
    if clean_features.device != x.device:
        raise ValueError(f"clean_features must be on x's device {x.device}; got {clean_features.device}")
    eps = _check_nonneg("epsilon", epsilon)
    step = _check_nonneg("step_size", step_size)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0; got {steps!r}")
    tau = _check_nonneg("temperature", temperature)
    if tau <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if feature_fn is not None and not callable(feature_fn):
        raise TypeError(f"feature_fn must be callable or None; got {type(feature_fn).__name__}")
    if gather is not None and not callable(gather):
        raise TypeError(f"gather must be callable or None; got {type(gather).__name__}")

    x = x.detach()
    # x_adv, its gradient and the ball centres share one dense layout (x's, when x is dense).
    x_ref = x if _is_dense(x) else x.contiguous()
    clean = clean_features.detach().reshape(clean_features.shape[0], -1)
    x_adv = torch.empty_like(x_ref)  # keeps x_ref's strides exactly (dense input)
    if x_init is not None:
        if not isinstance(x_init, torch.Tensor):
            raise TypeError(f"x_init must be a Tensor or None; got {type(x_init).__name__}")
        if x_init.shape != x.shape or x_init.dtype != x.dtype or x_init.device != x.device:
            raise ValueError(
                f"x_init must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}); got shape "
                f"{tuple(x_init.shape)}, {x_init.dtype}, {x_init.device}"
            )
        x_adv.copy_(x_init.detach())
        # Project the given start on the ball and the box (a step of size 0 is exactly that).
        pgd_step(x_adv, torch.zeros_like(x_adv), x_ref, 0.0, eps, lower=lower, upper=upper, backend=backend)
    elif random_start and eps > 0:
        x_adv.copy_(pgd_init(x_ref, eps, lower=lower, upper=upper, generator=generator))
    else:
        x_adv.copy_(x_ref)

    with attack_mode(encoder), torch.enable_grad():
        for _ in range(int(steps)):
            x_var = x_adv.detach().requires_grad_(True)
            feats = encoder_features(encoder, x_var, feature_fn)
            if gather is not None:
                feats = gather(feats)
                if feats.shape[0] != clean.shape[0]:
                    raise ValueError(
                        f"gathered features have batch {feats.shape[0]} but clean_features has "
                        f"{clean.shape[0]}: with gather, pass the global clean features"
                    )
            anchors = clean
            if feats.dtype != clean.dtype:  # e.g. bf16 features under autocast: use the wider dtype
                wide = torch.promote_types(feats.dtype, clean.dtype)
                feats, anchors = feats.to(wide), clean.to(wide)
            loss = nt_xent(feats, anchors, tau, backend=backend)
            (grad,) = torch.autograd.grad(loss, x_var)
            del feats, anchors, loss, x_var
            if not _same_layout(grad, x_adv):  # autograd may return another layout
                grad = torch.empty_like(x_adv).copy_(grad)
            pgd_step(x_adv, grad, x_ref, step, eps, lower=lower, upper=upper, backend=backend)
    return x_adv.detach()
