"""The head that reads the purified features, for the health check's changed predictions and the
head term of the fine-tune loss (``PurifyConfig.head_weight``, on by default when a head is known).

Purifying changes the encoder only; a classifier keeps its head. When that head is known, the share
of held-out images whose predicted class it changes (``health_head_change``) is measured exactly,
image by image, without a label: the argmax of ``head(f(x))`` against that of ``head(f0(x))``. Without
a head, the health check can only estimate it from pseudo classes (``health_flip``: k-means clusters
of the original features), which a real head's boundaries follow less well on fragile models.

Where the head comes from (``purify(..., head=...)``):

- ``None`` (the default): the classifier of a known family, if the model has one: timm
  ``get_classifier()``, the torchvision classifier whose input the features are (``fc``, ``heads``,
  ``head`` or ``classifier``), a Hugging Face ``*ForImageClassification``'s ``classifier``. It is
  used only once *verified*: on a few held-out images, the head applied to the run's features
  reproduces the model's own output (its logits). Anything else (a headless backbone, a family
  whose head reads something other than the features) gets no head, and the pseudo classes stand
  in.
- a ``str``: the name of the encoder's submodule that maps the features to logits, e.g. ``"fc"``
  when the whole classifier is purified with a ``feature_fn``; verified the same way, and an error
  when it cannot be.
- a callable (an ``nn.Module`` or a function): ``head(features [B, D]) -> logits [B, K]``, used as
  given, e.g. ``head=model.fc`` when ``model.backbone`` is purified. It is copied (a module) and run
  in eval mode without gradient; the caller's object is not touched.
- ``False``: no head.

A head from the model (auto or by name) is a frozen copy taken from the original encoder before any
update, so it is the head the user keeps.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cbd_fast.core.backbones import HeadInputFeatures, _unwrap, detect_family, find_submodule
from cbd_fast.core.features import encoder_features
from cbd_fast.core.modes import eval_mode

__all__ = ["FeatureHead", "HeadSpec", "check_head_argument", "resolve_head"]

logger = logging.getLogger(__name__)

#: what ``purify(head=...)`` accepts
HeadSpec = Any  # None | bool (False) | str | Callable[[torch.Tensor], torch.Tensor]
#: held-out images the verification of a head from the model runs on
VERIFY_IMAGES = 16
#: largest |head(features) - model output| / max |model output| a verified head may show (float32;
#: a reduced-precision run gets ``_REDUCED_TOL``): the two compute the same numbers, so anything
#: beyond rounding means the head does not read these features
_TOL, _REDUCED_TOL = 1e-4, 2e-2


class FeatureHead:
    """A classifier head as the health check calls it: ``head(z [M, D] float) -> [M, K] float32``.

    Args:
        module: the head (a frozen module copy, or the caller's callable).
        in_shape: the per-image shape the head takes its input in (the features are reshaped to
            ``[M, *in_shape]``; ``(D,)`` for a linear head, ``(C, 1, 1)`` for one that starts with a
            2-D norm over a pooled map); None: as given.
        source: what the head is, in a few words (for the log line and the figures' description).
    """

    def __init__(self, module: Callable[[torch.Tensor], Any], in_shape: tuple[int, ...] | None, source: str):
        self.module = module
        self.in_shape = in_shape
        self.source = source

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits(z)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """[M, K] float32 logits of ``z`` [M, D], differentiable in ``z`` (the head's own
        parameters are frozen)."""
        x = z if self.in_shape is None else z.reshape(z.shape[0], *self.in_shape)
        if isinstance(self.module, nn.Module):
            p = next(self.module.parameters(), None)
            if p is not None:
                x = x.to(device=p.device, dtype=p.dtype)
            with eval_mode(self.module):
                out = self.module(x)
        else:
            out = self.module(x)
        return _logits(out, z.shape[0], f"the head ({self.source})")

    def predict(self, z: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """[M] int64 predicted class of each row of ``z`` [M, D]."""
        return torch.cat([self(z[i : i + chunk]).argmax(1) for i in range(0, len(z), chunk)])


def _logits(out: Any, batch: int, where: str) -> torch.Tensor:
    """``out`` as [B, K] float32 logits (a tensor, or a ``ModelOutput`` / dict with ``logits``)."""
    if not isinstance(out, torch.Tensor):
        field = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        if not isinstance(field, torch.Tensor):
            raise ValueError(f"{where} must return logits [B, K]; got {type(out).__name__}")
        out = field
    if out.dim() != 2 or out.shape[0] != batch or out.shape[1] < 2 or not out.is_floating_point():
        raise ValueError(
            f"{where} must return float logits [B, K] with B = {batch} and K >= 2 classes; got "
            f"shape {tuple(out.shape)}, {out.dtype}"
        )
    return out.float()


def check_head_argument(head: Any) -> None:
    """TypeError for a ``head`` argument of the wrong kind (before any work)."""
    if head is None or head is False or isinstance(head, str) or callable(head):
        return
    raise TypeError(
        "head must be None (the model's own classifier, if it has a verifiable one), False (none), the "
        f"name of the encoder's classifier submodule, or a callable features [B, D] -> logits [B, K]; got "
        f"{type(head).__name__} {head!r}"
    )


def _family_head(model: nn.Module, feature_fn: Any) -> tuple[str, nn.Module] | None:
    """(description, module) of the classifier a known family reads the features with, if any."""
    family = detect_family(model)
    inner = getattr(feature_fn, "inner", feature_fn)  # behind an input standardisation
    if family == "timm" and callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        name = "get_classifier()"
    elif family == "torchvision" and isinstance(inner, HeadInputFeatures):
        head, name = find_submodule(model, inner.head), f".{inner.head}"
    elif family == "transformers":
        head, name = getattr(model, "classifier", None), ".classifier"
    else:
        return None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        return None
    return f"{family} {type(model).__name__}{name}", head


def resolve_head(
    head: HeadSpec,
    encoder: nn.Module,
    feature_fn: Callable[[nn.Module, torch.Tensor], Any] | None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None,
    images: torch.Tensor,
    autocast: Callable[[], Any],
    *,
    reduced_precision: bool = False,
) -> FeatureHead | None:
    """The run's head (see the module docstring), or None.

    Args:
        head: the ``purify`` argument.
        encoder: the ORIGINAL module (before any update); read in eval mode, never changed.
        feature_fn: the run's feature function (None: the module's output).
        forward: the module's full forward as the run feeds it (``StandardisedInputs`` without an
            inner extractor when the inputs are standardised; None: ``encoder(x)``).
        images: [M, C, H, W] float held-out images on the run's device (the first
            ``VERIFY_IMAGES`` verify a head taken from the model).
        autocast: the run's autocast context factory.
        reduced_precision: the run computes in bf16 / fp16 (autocast or the parameters' dtype):
            the verification allows that rounding.

    Raises:
        ValueError: a head given by name that is not a submodule or does not reproduce the
            model's output.
    """
    check_head_argument(head)
    if head is False:
        return None
    if callable(head) and not isinstance(head, str):
        module = copy.deepcopy(head) if isinstance(head, nn.Module) else head
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
        return FeatureHead(module, None, f"given head {type(head).__name__}")
    model = _unwrap(encoder)
    if isinstance(head, str):
        found = find_submodule(model, head)
        if found is None:
            raise ValueError(f"head {head!r} is not a submodule of {type(model).__name__}")
        candidate: tuple[str, nn.Module] | None = (f"{type(model).__name__}.{head}", found)
    else:
        candidate = _family_head(model, feature_fn)
        if candidate is None:
            return None
    source, module = candidate
    try:
        in_shape = _verify(
            module, model, feature_fn, forward, images[:VERIFY_IMAGES], autocast, reduced_precision
        )
    except _Unverified as why:
        if isinstance(head, str):
            raise ValueError(f"head {head!r} cannot be used: {why}") from None
        logger.info("head %s not used by the health check: %s", source, why)
        return None
    with torch.no_grad():
        frozen = copy.deepcopy(module)
    frozen.requires_grad_(False)
    logger.info("head: %s (the health check measures its changed predictions)", source)
    return FeatureHead(frozen, in_shape, source)


class _Unverified(Exception):
    """Why a head taken from the model cannot be trusted to read the run's features."""


@torch.no_grad()
def _verify(
    head: nn.Module,
    model: nn.Module,
    feature_fn: Any,
    forward: Any,
    x: torch.Tensor,
    autocast: Callable[[], Any],
    reduced_precision: bool,
) -> tuple[int, ...]:
    """The head's per-image input shape, after checking that ``head(features(x))`` equals the
    model's own output on ``x`` (eval mode, no gradient); raises :class:`_Unverified`."""
    captured: list[tuple[int, ...]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            captured.append(tuple(args[0].shape[1:]))

    with eval_mode(model), autocast():
        handle = head.register_forward_pre_hook(hook)
        try:
            out = model(x) if forward is None else forward(model, x)
        except Exception as exc:  # noqa: BLE001 - any failure only means: no verified head
            raise _Unverified(f"the model's forward failed ({type(exc).__name__}: {exc})") from None
        finally:
            handle.remove()
        z = encoder_features(model, x, feature_fn).float()
    try:
        logits = _logits(out, x.shape[0], "the model")
    except ValueError as exc:
        raise _Unverified(str(exc)) from None
    if len(captured) != 1:
        raise _Unverified(f"the forward called it {len(captured)} times (once expected)")
    in_shape = captured[0]
    if int(torch.Size(in_shape).numel()) != z.shape[1]:
        raise _Unverified(f"its input {in_shape} per image is not the {z.shape[1]}-d features")
    try:
        with autocast():
            pred = FeatureHead(head, in_shape, "")(z)
    except Exception as exc:  # noqa: BLE001
        raise _Unverified(f"it fails on the features ({type(exc).__name__}: {exc})") from None
    if pred.shape != logits.shape:
        raise _Unverified(f"it returns {tuple(pred.shape)} where the model returns {tuple(logits.shape)}")
    scale = float(logits.abs().max()) + 1e-12
    err = float((pred - logits).abs().max()) / scale
    tol = _REDUCED_TOL if reduced_precision else _TOL
    if not err <= tol:
        raise _Unverified(f"head(features) differs from the model's output by {err:.2g} (relative)")
    return in_shape
