"""Which [B, D] vector of a backbone CBD purifies: one feature extractor per model family, chosen
automatically, and the extractors the command line offers by name.

CBD pulls adversarial *features* back to clean ones, so it must read the vector a downstream head
reads, one per image: not a classifier's logits, not a token sequence, not a pooled map through a
randomly initialised layer. :func:`auto_feature_fn` picks it from the module's family (the package
its class comes from; nothing is imported to find out):

- timm: ``forward_features(x)``, then the model's own pooling ``forward_head(..., pre_logits=True)``
  (avg pool for a ResNet or ConvNeXt, the CLS token for a ViT);
- torchvision: the input of the classifier (``fc``, ``heads``, ``head`` or ``classifier``), captured
  by a pre-hook that stops the forward there, so the head never runs (ResNet: the global avg pool;
  ViT: the CLS token after the final LayerNorm);
- transformers: the base model's output (``model.base_model(pixel_values=x)``): a token sequence's
  CLS token ``last_hidden_state[:, 0]``; a convolutional model's ``pooler_output`` (parameter-free
  pooling), else ``last_hidden_state`` averaged over H, W;
- anything else: the module's own output (a headless backbone).

A Hugging Face ViT's ``pooler_output`` is not used: it passes the CLS token through a dense layer and
tanh that image classifiers never read and that ``AutoModel`` initialises at random when it loads a
classification checkpoint. An explicit ``feature_fn`` always wins over the automatic choice.

Every extractor is a picklable object ``fn(module, x [B, C, H, W] float) -> [B, D]`` with a
``describe()`` used for the one log line of a run (``features: timm forward_features + avg pool,
768-d``), the report and the purification record.

Example:
    >>> import torch
    >>> auto_feature_fn(torch.nn.Linear(4, 2)) is None   # not a known family: its output is the feature
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cbd_fast.core.features import flatten_features

__all__ = [
    "FAMILIES",
    "BackboneFeatures",
    "ForwardFeatures",
    "HeadInputFeatures",
    "StandardisedInputs",
    "SubmoduleFeatures",
    "TransformersFeatures",
    "auto_feature_fn",
    "describe_features",
    "detect_family",
    "find_submodule",
    "standardisation_hint",
    "with_standardisation",
]

#: the model families with an automatic feature extractor
FAMILIES = ("timm", "torchvision", "transformers")

#: torchvision classifier attributes whose input is the pre-logits feature, in lookup order
_TORCHVISION_HEADS = ("fc", "heads", "head", "classifier")
#: what the input of a torchvision head is, per model class (for the description only)
_TORCHVISION_POOL = {
    "ResNet": "global avg pool",
    "VisionTransformer": "CLS token",
    "SwinTransformer": "avg pool",
    "ConvNeXt": "avg pool",
    "RegNet": "avg pool",
    "EfficientNet": "avg pool",
    "MobileNetV2": "avg pool",
    "MobileNetV3": "avg pool",
    "DenseNet": "avg pool",
}


class _StopForward(Exception):
    """Raised by a capture hook to end the forward pass once the features are captured."""


def _class_name(module: Any) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return f"ScriptModule({getattr(module, 'original_name', type(module).__name__)})"
    return type(module).__name__


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module) and type(module).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "OptimizedModule",
        ):
            return inner
    return module


def _walk(root: nn.Module, name: str) -> nn.Module | None:
    target: object = root
    for part in name.split("."):
        children = dict(target.named_children()) if isinstance(target, nn.Module) else {}
        if part not in children:
            return None
        target = children[part]
    return target if isinstance(target, nn.Module) else None


def find_submodule(module: nn.Module, name: str) -> nn.Module | None:
    """The submodule ``name`` (dotted, as in ``named_modules()``) of ``module`` or of the model inside
    a DDP / ``torch.compile`` wrapper; None when there is none."""
    for root in (module, getattr(module, "module", None), getattr(module, "_orig_mod", None)):
        if isinstance(root, nn.Module):
            found = _walk(root, name)
            if found is not None:
                return found
    return None


def _features(out: Any, batch: int, where: str) -> torch.Tensor:
    """``flatten_features(out, batch)`` with errors prefixed by ``where``."""
    try:
        return flatten_features(out, batch)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------ extractors


class BackboneFeatures:
    """A feature extractor: ``fn(module, x) -> features``.

    Subclasses implement ``__call__(module, x)`` (``x`` [B, C, H, W] float images; returns
    [B, D] features in the forward's dtype, differentiable w.r.t. ``x`` and the parameters) and
    :meth:`describe`. Instances hold no tensors and pickle by value.
    """

    family = "module"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        """What the features are, in a few words (no dimension)."""
        return repr(self)


class SubmoduleFeatures(BackboneFeatures):
    """The output of submodule ``name``, flattened to [B, D].

    A forward hook captures the submodule's output and raises to stop the forward there, so the
    layers after it (the head) are never computed. Works on deep copies and on DDP/compile wrappers
    (the name is looked up on the module it is called with). A tuple/list output gives its first item.

    Args:
        name: a name from ``module.named_modules()``, e.g. ``"backbone"`` or ``"layer4"``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        sub = find_submodule(module, self.name)
        if sub is None:
            raise ValueError(f"feature layer {self.name!r} not found in {_class_name(module)}")
        captured: list[Any] = []

        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            captured.append(out)
            raise _StopForward

        handle = sub.register_forward_hook(hook)
        try:
            module(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"feature layer {self.name!r} was not called by {_class_name(module)}.forward")
        out = captured[0]
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        return _features(out, x.shape[0], f"feature layer {self.name!r}")

    def describe(self) -> str:
        return f"output of submodule {self.name!r}"

    def __repr__(self) -> str:
        return f"SubmoduleFeatures({self.name!r})"


class HeadInputFeatures(BackboneFeatures):
    """The input of the classifier submodule ``head`` (the pre-logits features), flattened to [B, D].

    A forward pre-hook captures the head's first argument and raises to stop the forward there: the
    head itself never runs. Used for torchvision classifiers (``fc`` of a ResNet, ``heads`` of a
    ViT, whose input is the CLS token after the final LayerNorm).

    Args:
        head: the classifier's attribute name (dotted names work).
        family: the model family, for the description.
        model: the model's class name, for the description.
        pooling: what the head's input is (e.g. ``"global avg pool"``), for the description.
    """

    def __init__(self, head: str, *, family: str = "module", model: str = "", pooling: str = "") -> None:
        self.head = head
        self.family = family
        self.model = model
        self.pooling = pooling

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        sub = find_submodule(module, self.head)
        if sub is None:
            raise ValueError(f"classifier {self.head!r} not found in {_class_name(module)}")
        captured: list[Any] = []

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0] if args else None)
            raise _StopForward

        handle = sub.register_forward_pre_hook(hook)
        try:
            module(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"the classifier {self.head!r} was not called by {_class_name(module)}.forward: pass "
                "feature_fn to pick the features"
            )
        return _features(captured[0], x.shape[0], f"input of {self.head!r}")

    def describe(self) -> str:
        what = f" ({self.pooling})" if self.pooling else ""
        model = f" {self.model}" if self.model else ""
        return f"{self.family}{model}: input of .{self.head}{what}"

    def __repr__(self) -> str:
        return f"HeadInputFeatures({self.head!r})"


class ForwardFeatures(BackboneFeatures):
    """timm-style ``forward_features(x)``, then ``forward_head(..., pre_logits=True)`` when the model
    has it (its own pooling: avg pool for a ResNet or ConvNeXt, the CLS token for a ViT), flattened
    to [B, D].

    Args:
        pooling: what ``forward_head(pre_logits=True)`` does (e.g. ``"avg pool"``), for the description.
        family: the model family, for the description.
    """

    def __init__(self, pooling: str = "", family: str = "timm") -> None:
        self.pooling = pooling
        self.family = family

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        root = module
        if not hasattr(root, "forward_features"):  # a DDP / torch.compile wrapper
            root = getattr(module, "module", getattr(module, "_orig_mod", module))
        feats = root.forward_features(x)
        if hasattr(root, "forward_head"):
            feats = root.forward_head(feats, pre_logits=True)
        return _features(feats, x.shape[0], f"{_class_name(root)}.forward_features")

    def describe(self) -> str:
        return f"{self.family} forward_features + {self.pooling or 'forward_head(pre_logits=True)'}"

    def __repr__(self) -> str:
        return "ForwardFeatures()"


def _output_field(out: Any, name: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


class TransformersFeatures(BackboneFeatures):
    """A Hugging Face transformers vision model's features, from its base model's output.

    ``model.base_model(pixel_values=x)`` (the backbone without a task head; the model itself when it
    is one), then: the CLS token ``last_hidden_state[:, 0]`` of a token sequence [B, T, D]; else
    ``pooler_output`` (a convolutional model's parameter-free pooling); else ``last_hidden_state``
    [B, C, H, W] averaged over H and W. What was used is kept in ``source`` after the first call.

    Args:
        model: the model's class name, for the description.
    """

    family = "transformers"

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.source: str | None = None

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        root = _unwrap(module)
        base = getattr(root, "base_model", None)
        base = base if isinstance(base, nn.Module) else root
        out = base(pixel_values=x)
        hidden = _output_field(out, "last_hidden_state")
        pooled = _output_field(out, "pooler_output")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            feats, source = hidden[:, 0], "CLS token (last_hidden_state[:, 0])"
        elif isinstance(pooled, torch.Tensor):
            feats, source = pooled, "pooler_output"
        elif isinstance(hidden, torch.Tensor) and hidden.dim() == 4:
            feats, source = hidden.mean(dim=(2, 3)), "last_hidden_state averaged over H, W"
        else:
            keys = list(out.keys()) if isinstance(out, Mapping) else type(out).__name__
            raise ValueError(
                f"{_class_name(base)} returned no last_hidden_state [B, T, D] / [B, C, H, W] or "
                f"pooler_output (got {keys}): pass feature_fn to pick the features"
            )
        self.source = source
        return _features(feats, x.shape[0], f"{_class_name(base)} {source}")

    def describe(self) -> str:
        model = f" {self.model}" if self.model else ""
        return f"transformers{model} {self.source or 'CLS token or pooled output'}"

    def __repr__(self) -> str:
        return f"TransformersFeatures({self.model!r})"


class StandardisedInputs(BackboneFeatures):
    """Feeds the encoder ``(x - mean) / std`` per channel, then extracts as ``inner`` does.

    ``purify`` works on images in [0, 1] (the attack's radius and box, the search's triggers, the
    augmentation) while a backbone trained on standardised inputs (an ImageNet model: mean 0.485,
    0.456, 0.406, std 0.229, 0.224, 0.225) must see them standardised: ``PurifyConfig.input_mean``
    and ``input_std`` put this step in front of every forward of the run. The purified module is
    returned without it, to be used exactly as before.

    Args:
        mean, std: per-channel values (one value: every channel), std > 0.
        inner: the feature extractor after the step (None: the module's own output).
    """

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], inner: BackboneFeatures | Callable | None
    ) -> None:
        self.mean, self.std, self.inner = tuple(mean), tuple(std), inner
        self.family = getattr(inner, "family", "module")
        self._consts: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = len(self.mean)
        if x.dim() != 4 or n not in (1, x.shape[1]):
            raise ValueError(
                f"input_mean / input_std have {n} value(s) per channel but the images have shape "
                f"{tuple(x.shape)} ([B, C, H, W] with C = {x.shape[1] if x.dim() > 1 else '?'}); give one "
                "value per channel, or one for all"
            )
        key = (x.device, x.dtype)
        if key not in self._consts:  # [1, C, 1, 1] constants, once per device and dtype
            shape = (1, n, 1, 1)
            self._consts[key] = (
                torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape),
                torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape),
            )
        mean, std = self._consts[key]
        x = (x - mean) / std
        return module(x) if self.inner is None else self.inner(module, x)

    def describe(self) -> str:
        inner = describe_features(self.inner)
        return f"{inner}, inputs standardised (mean {_fmt(self.mean)}, std {_fmt(self.std)})"

    def __getstate__(self) -> dict[str, Any]:  # pickles without the cached tensors
        return {**self.__dict__, "_consts": {}}

    def __repr__(self) -> str:
        return f"StandardisedInputs(mean={self.mean}, std={self.std}, inner={self.inner!r})"


def with_standardisation(
    feature_fn: Callable | None, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
) -> Callable | None:
    """``feature_fn`` behind ``(x - mean) / std`` (a :class:`StandardisedInputs`); unchanged when
    ``mean`` is None or the step is the identity (mean 0, std 1)."""
    if mean is None or std is None or _identity(mean, std):
        return feature_fn
    return StandardisedInputs(mean, std, feature_fn)


def _identity(mean: tuple[float, ...], std: tuple[float, ...]) -> bool:
    return all(v == 0.0 for v in mean) and all(v == 1.0 for v in std)


def _fmt(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def standardisation_hint(module: nn.Module) -> str | None:
    """A warning for a model that declares the input standardisation it expects (a timm model's
    ``pretrained_cfg`` mean / std) when the run does not apply one; None when it declares none."""
    model = _unwrap(module)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(cfg, Mapping):
        return None
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        return None
    if _identity(mean, std):
        return None
    return (
        f"{_class_name(model)} declares input standardisation mean ({_fmt(mean)}) std ({_fmt(std)}) "
        "(pretrained_cfg), and purify feeds it the images in [0, 1] as given. If the model was "
        f"trained on standardised images, pass PurifyConfig(input_mean={mean}, input_std={std}); if "
        "it was trained on [0, 1] images, set input_mean=(0.0,), input_std=(1.0,) to silence this"
    )


# ------------------------------------------------------------------------------------------ choice


def detect_family(module: nn.Module) -> str | None:
    """``"timm"``, ``"torchvision"`` or ``"transformers"`` from the package the module's class (or
    the wrapped model's, under DDP / ``torch.compile``) is defined in; None for anything else
    (TorchScript archives included)."""
    where = type(_unwrap(module)).__module__ or ""
    for family in FAMILIES:
        if where == family or where.startswith(family + "."):
            return family
    return None


def _timm_pooling(model: nn.Module) -> str:
    """What a timm model's ``forward_head(pre_logits=True)`` does, in words."""
    pool: Any = getattr(model, "global_pool", None)
    if pool is None:
        pool = getattr(getattr(model, "head", None), "global_pool", None)
    if isinstance(pool, str):
        return {
            "token": "CLS token",
            "avg": "avg pool over tokens",
            "avgmax": "avg+max pool over tokens",
            "max": "max pool over tokens",
            "map": "attention pool",
            "": "no pooling",
        }.get(pool, f"{pool} pooling")
    kind = getattr(pool, "pool_type", None)
    if isinstance(kind, str):
        return f"{kind} pool" if kind else "no pooling (flattened)"
    return ""


def auto_feature_fn(module: nn.Module) -> BackboneFeatures | None:
    """The automatic feature extractor of ``module``'s family (see the module docstring).

    Args:
        module: the model (any ``nn.Module``; DDP / ``torch.compile`` wrappers are looked through).

    Returns:
        a :class:`BackboneFeatures`, or None when the module's own output is the feature (not a known
        family, or a torchvision model without a classifier attribute).
    """
    family = detect_family(module)
    model = _unwrap(module)
    name = type(model).__name__
    if family == "timm" and hasattr(model, "forward_features"):
        return ForwardFeatures(pooling=_timm_pooling(model), family="timm")
    if family == "torchvision":
        children = dict(model.named_children())
        for head in _TORCHVISION_HEADS:
            if head in children:
                pooling = _TORCHVISION_POOL.get(name, "the classifier's input")
                return HeadInputFeatures(head, family="torchvision", model=name, pooling=pooling)
        return None
    if family == "transformers":
        return TransformersFeatures(name)
    return None


def describe_features(feature_fn: Callable[..., Any] | None, dim: int | None = None) -> str:
    """One line saying what the features are: ``"timm forward_features + avg pool, 768-d"``.

    Args:
        feature_fn: the run's feature function (None: the module's own output).
        dim: the feature dimension D, when known.
    """
    if feature_fn is None:
        what = "the module's output"
    elif isinstance(feature_fn, BackboneFeatures):
        what = feature_fn.describe()
    else:
        what = f"feature_fn {getattr(feature_fn, '__qualname__', None) or repr(feature_fn)}"
    return what if dim is None else f"{what}, {int(dim)}-d"
