"""The encoder's features: call it (or ``feature_fn``), check the output, flatten to [B, D].

The one place that turns "an encoder and a batch of images" into a feature matrix; the loop, the
attack, metrics, reports and diagnostics all call it, so a bad encoder output gets the same clear
error everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cbd_fast.core.modes import eval_mode

__all__ = ["FeatureFn", "Features", "flatten_features", "encoder_features", "batched_features"]

#: ``feature_fn(module, images [B, C, H, W]) -> features [B, ...]`` (e.g. ``lambda m, x: m.features(x)``).
FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def flatten_features(out: Any, batch: int | None = None, *, strict: bool = False) -> torch.Tensor:
    """``out`` checked and flattened: a floating-point Tensor [B, ...] -> [B, D].

    With ``strict`` (what :func:`cbd_fast.purify` applies to the encoder's output before any
    training) only the shapes that are one vector per image pass: [B, D] as is, and a feature map
    [B, C, H, W] (a convolutional backbone without pooling), flattened to [B, C*H*W]. A 3-D tensor
    [B, T, D] (a transformer's token sequence) is refused: flattening it would purify T*D numbers
    per image instead of the one vector a head reads; ``feature_fn`` picks the CLS token or a pooled
    vector (``cbd_fast.core.backbones`` does it automatically for timm, torchvision and Hugging Face
    transformers models). Without ``strict`` any [B, ...] is flattened (the attack and the metrics
    take a caller's features as they are).

    Args:
        out: what the encoder (or feature function) returned.
        batch: the expected batch size B (None: whatever the first dimension is).
        strict: refuse a 3-D output and one of more than 4 dimensions.

    Raises:
        TypeError: not a Tensor (names the type, a mapping's keys, and how to pick the features), or
            not floating point.
        ValueError: no batch dimension, or one that is not ``batch``; with ``strict``, a 3-D token
            sequence or more than 4 dimensions.
    """
    if not isinstance(out, torch.Tensor):
        kind = type(out).__name__
        keys = ""
        if isinstance(out, Mapping):  # a dict or a Hugging Face ModelOutput
            keys = f" with keys {', '.join(map(str, list(out.keys())[:6]))}"
        raise TypeError(
            f"the encoder returned {kind}{keys}: it must return a Tensor of features [B, D]; got "
            f"a {kind}: pass feature_fn=lambda m, x: ... to pick the features "
            "(e.g. lambda m, x: m(x)[0]" + (", or m(x)['<key>'] for one of those keys" if keys else "") + ")"
        )
    if out.dim() == 0 or (batch is not None and out.shape[0] != batch):
        want = f"the batch size {batch}" if batch is not None else "a batch dimension"
        raise ValueError(f"the encoder's features must have {want} first; got shape {tuple(out.shape)}")
    if not out.dtype.is_floating_point:
        raise TypeError(f"the encoder's features must be floating point; got dtype {out.dtype}")
    if strict and out.dim() == 3:
        raise ValueError(
            f"the encoder returned a 3-D tensor of shape {tuple(out.shape)}, e.g. a transformer's token "
            "sequence [B, T, D]: flattening it would purify T*D numbers per image, not one feature "
            "vector. Pick one with feature_fn, e.g. feature_fn=lambda m, x: m(x)[:, 0] (the CLS token) "
            "or lambda m, x: m(x).mean(1) (mean over tokens); lambda m, x: m(x).flatten(1) flattens "
            "on purpose"
        )
    if strict and out.dim() > 4:
        raise ValueError(
            f"the encoder's features must be [B, D] or a feature map [B, C, H, W]; got shape "
            f"{tuple(out.shape)}: pass feature_fn to pick one vector per image"
        )
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

    @property
    def feature_fn(self) -> FeatureFn | None:
        """The feature function (None: the encoder's own output)."""
        return self._feature_fn

    def raw(self, x: torch.Tensor) -> Any:
        """What the encoder (or ``feature_fn``) returns for ``x``, not flattened or checked."""
        return self.encoder(x) if self._feature_fn is None else self._feature_fn(self.encoder, x)


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
