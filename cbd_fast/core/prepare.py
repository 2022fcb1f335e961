"""Setting up a purification run and handing the module back: device and precision, the working
copy of the encoder, the frozen original, trainable parameters, optimiser and schedule.

:func:`prepare_run` returns a :class:`Run` that the step (``step.py``), the epoch loop
(``epoch.py``) and the checkpoint state (``run_state.py``) share; :func:`finish_run` undoes every
change the run made to the module's flags, wrappers and placement.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbd_fast.core import distributed as dist
from cbd_fast.core.adversaries import Adversary, make_adversary
from cbd_fast.core.checkpoint import model_fingerprint
from cbd_fast.core.clean_terms import CleanTerm, make_clean_term
from cbd_fast.core.config import PurifyConfig
from cbd_fast.core.features import FeatureFn, Features, flatten_features
from cbd_fast.core.modes import is_batchnorm
from cbd_fast.core.reference_cache import ReferenceCache
from cbd_fast.core.spike_guard import SpikeGuard

__all__ = [
    "Run",
    "RunContext",
    "make_context",
    "prepare_run",
    "finish_run",
    "check_encoder",
    "has_conv2d",
    "use_contiguous",
]

_AMP = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunContext:
    """Where and how the run computes (decided before the data is read).

    Attributes:
        dist: the ``torch.distributed`` context (``enabled=False`` in one process).
        device: the run's device.
        world: the number of ranks (1 in one process).
        local_batch_size: this rank's share of ``config.batch_size``.
        amp_dtype: the autocast dtype (None: no autocast).
        channels_last: convert the encoder and its inputs to channels-last (``"auto"``: on CUDA, and
            on the CPU for encoders with a Conv2d, decided in :func:`prepare_run`).
    """

    dist: dist.DistContext
    device: torch.device
    world: int
    local_batch_size: int
    amp_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self) -> Any:
        """The run's autocast context (a null context for float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def make_context(config: PurifyConfig) -> RunContext:
    """Resolve the process group, the device, the local batch and the precision of ``config``."""
    ctx = dist.init_context(config)
    dist.check_config(config, ctx)
    on_cuda = ctx.device.type == "cuda"
    amp = (torch.bfloat16 if on_cuda else None) if config.amp_dtype == "auto" else _AMP[config.amp_dtype]
    return RunContext(
        dist=ctx,
        device=ctx.device,
        world=ctx.world_size if ctx.enabled else 1,
        local_batch_size=dist.local_batch_size(config.batch_size, ctx),
        amp_dtype=amp,
        channels_last=on_cuda if config.channels_last == "auto" else bool(config.channels_last),
    )


@dataclass
class Run:
    """Everything a prepared run holds.

    Attributes:
        config: the validated config.
        ctx: the :class:`RunContext`.
        model: the module being purified (a deep copy unless in place), on the run's device.
        features: ``model`` as an [B, D] encoder (``Features``), used by the anchors and the attack.
        train_forward: the fine-tune forward: ``features``, or the DDP-wrapped module, maybe compiled.
        net: the DDP wrapper when distributed, else ``model``.
        reference: the frozen original as an encoder, for clean terms that compare to it (or None).
        adversary, clean_term: the run's plug-ins.
        optimizer, scheduler: SGD/Adam(W) over the trainable parameters; the per-epoch lr factor.
        guard: the gradient spike guard.
        fingerprint: the architecture fingerprint (parameter names and shapes) checkpoints carry.
        dtype: the encoder's parameter dtype (images are cast to it).
        orig_device: where the caller's encoder lives (the result goes back there).
        flags, requires_grad: the caller's training flags and requires_grad, restored at the end.
        reference_cache: the frozen original's features per sample index (``fit`` builds it when
            ``config.reference_cache`` allows; None: computed per batch).
        head: the head that reads the features (``cbd_fast.core.heads.FeatureHead``; ``fit`` sets it
            from the health check with :meth:`set_head`), for the head term; None: none.
        head_weight, clean_weight: the fine-tune loss's weights, the config's ``"auto"`` resolved
            for ``head`` (:meth:`set_head`).
    """

    config: PurifyConfig
    ctx: RunContext
    model: nn.Module
    features: nn.Module
    train_forward: Callable[[torch.Tensor], torch.Tensor]
    net: nn.Module
    reference: nn.Module | None
    adversary: Adversary
    clean_term: CleanTerm
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: SpikeGuard
    fingerprint: str
    dtype: torch.dtype
    orig_device: torch.device
    flags: dict[str, bool]
    requires_grad: dict[str, bool]
    reference_cache: ReferenceCache | None = None
    head: Any = None
    head_weight: float = 0.0
    clean_weight: float = 0.0

    def __post_init__(self) -> None:
        self.set_head(self.head)

    def set_head(self, head: Any) -> None:
        """Give the run its head (or None) and the loss weights that follow from it
        (``PurifyConfig.loss_weights``: ``"auto"`` turns the head term on with a head)."""
        self.head = head
        self.head_weight, self.clean_weight = self.config.loss_weights(head is not None)


def check_encoder(encoder: Any, feature_fn: Any, inplace: Any) -> None:
    """TypeError/ValueError for an argument ``prepare_run`` cannot use (before any work)."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module; got {type(encoder).__name__}")
    if feature_fn is not None and not callable(feature_fn):
        raise TypeError(f"feature_fn must be callable(module, x) -> features or None; got {feature_fn!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False; got {inplace!r}")
    if not any(p.is_floating_point() for p in encoder.parameters()):
        raise ValueError("encoder has no floating-point parameters: there is nothing to purify")


def _frozen_copy(encoder: nn.Module, ctx: RunContext, feature_fn: FeatureFn | None) -> nn.Module:
    with torch.no_grad():  # a ScriptModule deep-copied under grad mode gets non-leaf params
        ref = copy.deepcopy(encoder).to(ctx.device).eval()
    for p in ref.parameters():  # (ScriptModules have no module-level requires_grad_)
        p.requires_grad_(False)
    if ctx.channels_last:
        ref.to(memory_format=torch.channels_last)
    return Features(ref, feature_fn)


def _trainable(model: nn.Module, config: PurifyConfig) -> set[str]:
    """The caller's requires_grad choice (all floating parameters when none is set), minus
    BatchNorm affine weights under ``bn_policy="frozen"``."""
    named = list(model.named_parameters())
    trainable = {n for n, p in named if p.requires_grad and p.is_floating_point()}
    if not trainable:
        warnings.warn("no encoder parameter requires grad; purifying all of them", stacklevel=4)
        trainable = {n for n, p in named if p.is_floating_point()}
    if config.bn_policy == "frozen":
        for mname, m in model.named_modules():
            if is_batchnorm(m):
                for pname, _ in m.named_parameters(recurse=False):
                    trainable.discard(f"{mname}.{pname}" if mname else pname)
    if not trainable:
        raise ValueError("no parameter left to train (bn_policy='frozen' on a BatchNorm-only encoder?)")
    return trainable


def _optimizer(params: list[torch.Tensor], config: PurifyConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def prepare_run(
    config: PurifyConfig, ctx: RunContext, encoder: nn.Module, feature_fn: FeatureFn | None, inplace: bool
) -> Run:
    """Set up a run on ``encoder`` (checked with :func:`check_encoder` first).

    The caller's module is never changed unless ``inplace``: the run trains a deep copy, made under
    ``no_grad`` with the caller's requires_grad flags copied over.
    """
    first = next(p for p in encoder.parameters() if p.is_floating_point())
    if config.channels_last == "auto" and ctx.device.type == "cpu":
        ctx.channels_last = has_conv2d(encoder)
    clean_term = make_clean_term(config)
    adversary = make_adversary(config)
    # The frozen original (before any change) for terms that compare against it.
    needs_reference = (
        clean_term.needs_reference
        or config.pull_target == "original"
        or config.attack_anchors == "original"
        or config.head_weight == "auto"
        or config.head_term_required
    )
    reference = _frozen_copy(encoder, ctx, feature_fn) if needs_reference else None
    # The caller's flags, read from the caller's module (a copy made under no_grad loses them).
    flags = {name: m.training for name, m in encoder.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in encoder.named_parameters()}
    if inplace:
        model = encoder
    else:
        with torch.no_grad():  # (see _frozen_copy: keeps a ScriptModule's parameters leaves)
            model = copy.deepcopy(encoder)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
    model.to(ctx.device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    trainable = _trainable(model, config)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
        p.grad = None
    features = Features(model, feature_fn)
    net: nn.Module = model
    train_forward: Callable[[torch.Tensor], torch.Tensor] = features
    if ctx.dist.enabled:
        net = dist.wrap_model(model, ctx.dist, config, feature_fn)
        wrapped = net
        train_forward = lambda x: flatten_features(wrapped(x), x.shape[0])
    if config.compile:
        train_forward = torch.compile(train_forward)
    optimizer = _optimizer([p for n, p in model.named_parameters() if n in trainable], config)
    epochs, cosine = config.epochs, config.lr_schedule == "cosine"
    # lr factor of epoch e (0-based): 1 (constant) or 0.5 * (1 + cos(pi * e / epochs)) (cosine).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs)) if cosine else 1.0
    )
    return Run(
        config=config,
        ctx=ctx,
        model=model,
        features=features,
        train_forward=train_forward,
        net=net,
        reference=reference,
        adversary=adversary,
        clean_term=clean_term,
        optimizer=optimizer,
        scheduler=scheduler,
        guard=SpikeGuard(config.grad_spike_factor, ctx.device),
        fingerprint=model_fingerprint(model),
        dtype=first.dtype,
        orig_device=first.device,
        flags=flags,
        requires_grad=requires_grad,
    )


def has_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` holds a 2-D convolution: ``channels_last="auto"`` turns channels-last on
    for such encoders on the CPU too (the NHWC convolution and pooling kernels; 1.45-1.5x per run
    on the Fashion-MNIST CNN, ``benchmarks/NOTES.md``)."""
    # (a TorchScript module's submodules are RecursiveScriptModules that keep the original name)
    return any(
        isinstance(m, nn.Conv2d) or getattr(m, "original_name", None) == "Conv2d" for m in module.modules()
    )


def use_contiguous(run: Run) -> None:
    """Turn channels-last off for the rest of ``run`` (the model and the frozen original back to the
    contiguous format), e.g. after an encoder's forward refused channels-last inputs."""
    run.ctx.channels_last = False
    run.model.to(memory_format=torch.contiguous_format)
    if run.reference is not None:
        run.reference.to(memory_format=torch.contiguous_format)


def finish_run(run: Run) -> nn.Module:
    """Undo the run's changes to the module's flags, wrappers and placement; return the module."""
    model = dist.unwrap_model(run.net) if run.ctx.dist.enabled else run.model
    for name, m in model.named_modules():
        if name in run.flags:
            m.training = run.flags[name]
    for name, p in model.named_parameters():
        p.requires_grad_(run.requires_grad.get(name, p.requires_grad))
        p.grad = None
    if run.ctx.channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.to(run.orig_device)
    return model
