"""The encoder's features: call it (or ``feature_fn``), check the output, flatten to [B, D].

The one place that turns "an encoder and a batch of images" into a feature matrix; the loop, the
attack, metrics, reports and diagnostics all call it, so a bad encoder output gets the same clear
error everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cbd_fast.core.modes import eval_mode

__all__ = ["FeatureFn", "Features", "flatten_features", "encoder_features", "batched_features"]

#: ``feature_fn(module, images [B, C, H, W]) -> features [B, ...]`` (e.g. ``lambda m, x: m.features(x)``).
FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def flatten_features(out: Any, batch: int | None = None) -> torch.Tensor:
    """``out`` checked and flattened: a floating-point Tensor [B, ...] -> [B, D].

    Args:
        out: what the encoder (or feature function) returned.
        batch: the expected batch size B (None: whatever the first dimension is).

    Raises:
        TypeError: not a Tensor (names the type and how to pick the features), or not floating point.
        ValueError: no batch dimension, or one that is not ``batch``.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the encoder returned {type(out).__name__}: it must return a Tensor of features [B, D]; got "
            f"a {type(out).__name__}: pass feature_fn=lambda m, x: ... to pick the features "
            "(e.g. lambda m, x: m(x)[0])"
        )
    if out.dim() == 0 or (batch is not None and out.shape[0] != batch):
        want = f"the batch size {batch}" if batch is not None else "a batch dimension"
        raise ValueError(f"the encoder's features must have {want} first; got shape {tuple(out.shape)}")
    if not out.dtype.is_floating_point:
        raise TypeError(f"the encoder's features must be floating point; got dtype {out.dtype}")
    return out.reshape(out.shape[0], -1)


def encoder_features(
    encoder: nn.Module | Callable[[torch.Tensor], Any], x: torch.Tensor, feature_fn: FeatureFn | None = None
) -> torch.Tensor:
    """``flatten_features(feature_fn(encoder, x) if feature_fn else encoder(x), len(x))``: [B, D]."""
    out = encoder(x) if feature_fn is None else feature_fn(encoder, x)
    return flatten_features(out, x.shape[0])


class Features(nn.Module):
    """``forward(x) = encoder_features(encoder, x, feature_fn)``: any backbone as an [B, D] encoder.

    The wrapped encoder is a submodule, so ``.train()``/``.eval()`` and :func:`eval_mode` reach it.
    """

    def __init__(self, encoder: nn.Module, feature_fn: FeatureFn | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self._feature_fn = feature_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encoder_features(self.encoder, x, self._feature_fn)


@torch.no_grad()
def batched_features(
    encoder: nn.Module | Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    *,
    batch_size: int = 1000,
    feature_fn: FeatureFn | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Features of many images in eval mode without gradient, ``batch_size`` at a time.

    Args:
        encoder: a module (put in eval mode for the call; its flags restored) or a callable.
        images: [N, C, H, W] float images.
        batch_size: images per forward pass.
        feature_fn: optional ``feature_fn(encoder, x)``.
        device: move each chunk there first (None: leave it where it is).

    Returns:
        [N, D] features in the encoder's output dtype, on the encoder's output device.
    """
    out = []
    with eval_mode(encoder):
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            if device is not None:
                chunk = chunk.to(device)
            out.append(encoder_features(encoder, chunk, feature_fn))
    if not out:
        raise ValueError("no images to compute features of (got 0)")
    return torch.cat(out)
