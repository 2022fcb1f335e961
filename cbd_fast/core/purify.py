"""``purify``: the whole Contrastive Backdoor Defense loop behind one call.

Per batch of unlabeled images ``x`` (``shared/CBD.md``):

1. clean anchors ``c = f(x)`` once, without gradient, BatchNorm/dropout in eval mode;
2. the adversary (default: per-sample contrastive PGD, input-only gradients, eval mode) finds
   ``x_adv`` in the eps-ball that pushes ``f(x_adv)`` away from ``c``;
3. one optimiser step on ``NTXent(f(x_adv), f(x))`` (backdoor-to-standard pulling) plus
   ``clean_weight * clean_term`` (step 4, keeping clean behaviour), in one forward of ``[x_adv; x]``.

Scalars stay on the device: the loop reads them once per ``log_every`` batches and per epoch (no
``.item()`` per step), except ``nonfinite="skip"`` which must decide per batch. On CPU the NaN guard
checks every batch (a host read is free there).

Reproducibility: the data order is a pure function of (seed, epoch), the random starts of (seed,
epoch, sample index), dropout uses torch's global RNG forked from ``seed`` (the caller's RNG state is
restored afterwards) and saved in checkpoints, as is the adversary's state across batches
(``Adversary.state_dict``: the default adversary's scanned patches and warp field), so a resumed run
ends with exactly the weights of an uninterrupted one (CPU, same seed), and two runs with one seed
give identical weights. Python's ``random`` and NumPy are not used by the loop (their states are
neither seeded nor saved). A DataLoader passed by the caller keeps its own order (seed it with its
``generator``, whose state the checkpoints keep); its images have no dataset indices, so their random
starts are keyed by their position in the epoch instead.

Example:
    >>> import torch, cbd_fast
    >>> enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    >>> x = torch.rand(16, 1, 8, 8)
    >>> clean = cbd_fast.purify(enc, x, epochs=1, batch_size=8, progress=False)
    >>> clean is enc
    False
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbd_fast.core import checkpoint as ckpt
from cbd_fast.core.adversaries import AttackInputs, make_adversary
from cbd_fast.core.clean_terms import CleanTermInputs, augment, make_clean_term
from cbd_fast.core.config import PurifyConfig
from cbd_fast.core.inputs import EpochShuffleSampler, ImageStream
from cbd_fast.core.rng import per_sample_uniform

__all__ = ["purify", "Purifier", "PurifyResult", "FeatureFn"]

#: ``feature_fn(module, images [B, C, H, W]) -> features [B, ...]`` (e.g. ``lambda m, x: m.features(x)``).
FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]

_HISTORY_TERMS = ("loss", "loss_pull", "loss_clean", "attack_loss")


@dataclass
class PurifyResult:
    """What :meth:`Purifier.fit` returns.

    Attributes:
        encoder: the purified module (a copy unless ``inplace=True``), on the caller's device, with the
            caller's training flags and requires_grad flags, and no ``.grad``.
        history: one dict per epoch: ``epoch`` (1-based), ``loss`` (total), ``loss_pull`` (NT-Xent of
            adversarial vs clean features, the pulling term), ``loss_clean`` (the unweighted clean
            term, 0 for "none"), ``attack_loss`` (NT-Xent the attack reached against the clean anchors,
            measured in the fine-tune forward), ``lr``, ``images``, ``batches``, ``skipped_batches``
            (non-finite, with ``nonfinite="skip"``), ``dropped_batches`` (a last batch of 1 image),
            ``seconds`` and ``images_per_s``. Epochs restored from a checkpoint are included.
        config: the validated config used.
    """

    encoder: nn.Module
    history: list[dict[str, float]]
    config: PurifyConfig


#: steps of the gradient spike guard that only measure the norm (see Purifier._clip_gradient_spike)
_SPIKE_WARMUP = 3


class _NonFinite(RuntimeError):
    pass


class _Features(nn.Module):
    """``forward(x) = flatten(feature_fn(encoder, x) or encoder(x))`` with the output checked."""

    def __init__(self, encoder: nn.Module, feature_fn: FeatureFn | None) -> None:
        super().__init__()
        self.encoder = encoder
        self._feature_fn = feature_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x) if self._feature_fn is None else self._feature_fn(self.encoder, x)
        return _flatten_features(out, x.shape[0])


def _flatten_features(out: Any, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        kind = type(out).__name__
        raise TypeError(
            f"the encoder must return a Tensor of features [B, D]; got a {kind}. Pass "
            "feature_fn=lambda m, x: ... to pick the features (e.g. lambda m, x: m(x)[0])"
        )
    if out.dim() == 0 or out.shape[0] != batch:
        raise ValueError(
            f"the encoder's features must have the batch size {batch} first; got shape {tuple(out.shape)}"
        )
    if not out.dtype.is_floating_point:
        raise TypeError(f"the encoder's features must be floating point; got dtype {out.dtype}")
    return out.reshape(batch, -1)


_BN_NAMES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GlobalBatchNorm"})


def _is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm layer, also inside a TorchScript module (whose submodules keep only their name)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(m, torch.jit.ScriptModule) and getattr(m, "original_name", "") in _BN_NAMES


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto' or a torch device string; got {spec!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} was requested but CUDA is not available here")
    return dev


class _Dist:
    """The distributed hooks (``cbd_fast.core.distributed``) or, when that module is missing, one process."""

    def __init__(self, config: PurifyConfig) -> None:
        try:
            self.mod: Any = importlib.import_module("cbd_fast.core.distributed")
        except ImportError:  # pragma: no cover - the module ships with the package
            self.mod = None
        device = _resolve_device(config.device)
        if self.mod is not None:
            self.ctx = self.mod.init_context(config)
        else:  # pragma: no cover
            if config.distributed is True:
                raise RuntimeError("distributed=True but cbd_fast.core.distributed is not available")
            self.ctx = _LocalContext(device)
        if not self.ctx.enabled:
            self.ctx = _LocalContext(device, self.ctx)

    @property
    def enabled(self) -> bool:
        return bool(self.ctx.enabled)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.mod, name)(*args, **kwargs)

    def gather_with_grad(self, z: torch.Tensor) -> torch.Tensor:
        return self.mod.gather_with_grad(z, self.ctx) if self.enabled else z

    def gather_local_grad(self, z: torch.Tensor) -> torch.Tensor:
        return self.mod.gather_local_grad(z, self.ctx) if self.enabled else z

    def gather_no_grad(self, z: torch.Tensor) -> torch.Tensor:
        return self.mod.gather_no_grad(z, self.ctx) if self.enabled else z

    def run_guard(self) -> Any:
        return self.mod.run_guard(self.ctx) if self.enabled else contextlib.nullcontext()


@dataclass(frozen=True)
class _LocalContext:
    device: torch.device
    base: Any = None
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True


class Purifier:
    """The CBD loop as an object: :meth:`fit` for a whole run, :meth:`prepare` + :meth:`step` for
    one batch at a time (benchmarks, custom loops).

    Args:
        config: a :class:`PurifyConfig`, a dict of its fields, or None for the defaults.
        **overrides: PurifyConfig field values that replace the config's (unknown names -> TypeError
            listing the valid ones).

    Example:
        >>> import torch, cbd_fast
        >>> enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
        >>> purifier = cbd_fast.Purifier(epochs=1, batch_size=8, progress=False)
        >>> result = purifier.fit(enc, torch.rand(16, 1, 8, 8))
        >>> sorted(result.history[0])[:3]
        ['attack_loss', 'batches', 'dropped_batches']
    """

    def __init__(self, config: PurifyConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        if config is None:
            config = PurifyConfig()
        elif isinstance(config, dict):
            config = PurifyConfig.from_dict(config)
        elif not isinstance(config, PurifyConfig):
            raise TypeError(f"config must be a PurifyConfig, a dict or None; got {type(config).__name__}")
        self.config = config.replace(**overrides)  # a validated copy: the caller's object is not touched
        self._prepared = False

    # ------------------------------------------------------------------ set-up
    def prepare(
        self, encoder: nn.Module, feature_fn: FeatureFn | None = None, *, inplace: bool = False
    ) -> nn.Module:
        """Set up the run: the working copy on the device, optimiser, schedule, adversary, clean term.

        Args:
            encoder: maps float images [B, C, H, W] in [0, 1] to features [B, D] (or [B, ...],
                flattened); or, with ``feature_fn``, any module (e.g. a whole classifier).
            feature_fn: optional ``feature_fn(module, x) -> features``.
            inplace: train ``encoder`` itself instead of a deep copy.

        Returns:
            the module being purified (on the run's device).
        """
        self._check_encoder(encoder, feature_fn, inplace)
        self._setup_context()
        self._setup_model(encoder, feature_fn, inplace)
        return self.model

    def _check_encoder(self, encoder: Any, feature_fn: Any, inplace: Any) -> None:
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module; got {type(encoder).__name__}")
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(f"feature_fn must be callable(module, x) -> features or None; got {feature_fn!r}")
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be True or False; got {inplace!r}")
        if not any(p.is_floating_point() for p in encoder.parameters()):
            raise ValueError("encoder has no floating-point parameters: there is nothing to purify")

    def _setup_context(self) -> None:
        cfg = self.config
        self._dist = _Dist(cfg)
        ctx = self._dist.ctx
        self.device = ctx.device
        if self._dist.mod is not None and hasattr(self._dist.mod, "check_config"):
            self._dist.call("check_config", cfg, ctx)
        self._world = ctx.world_size if ctx.enabled else 1
        if self._dist.mod is not None and hasattr(self._dist.mod, "local_batch_size"):
            self.local_batch_size = self._dist.call("local_batch_size", cfg.batch_size, ctx)
        else:  # pragma: no cover
            self.local_batch_size = cfg.batch_size
        on_cuda = self.device.type == "cuda"
        amp = {
            "auto": torch.bfloat16 if on_cuda else None,
            "float32": None,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[cfg.amp_dtype]
        self._amp_dtype = amp
        self._channels_last = on_cuda if cfg.channels_last == "auto" else bool(cfg.channels_last)

    def _autocast(self) -> Any:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    def _setup_model(self, encoder: nn.Module, feature_fn: FeatureFn | None, inplace: bool) -> None:
        cfg = self.config
        first = next(p for p in encoder.parameters() if p.is_floating_point())
        self._orig_device, self.dtype = first.device, first.dtype
        self._inplace = inplace
        self._clean_term = make_clean_term(cfg)
        self._adversary = make_adversary(cfg)
        self._grad_ema: torch.Tensor | None = None  # running mean of gradient norms (spike guard)
        self._grad_steps = 0
        # The frozen original (before any change) for terms that compare against it.
        self._reference: nn.Module | None = None
        if self._clean_term.needs_reference:
            with torch.no_grad():  # a ScriptModule deep-copied under grad mode gets non-leaf params
                ref = copy.deepcopy(encoder).to(self.device).eval()
            for p in ref.parameters():  # (ScriptModules have no module-level requires_grad_)
                p.requires_grad_(False)
            if self._channels_last:
                ref.to(memory_format=torch.channels_last)
            self._reference = _Features(ref, feature_fn)
        # The caller's flags, read from the caller's module (a copy made under no_grad loses them).
        self._flags = {name: m.training for name, m in encoder.named_modules()}
        self._requires_grad = {name: p.requires_grad for name, p in encoder.named_parameters()}
        if inplace:
            model = encoder
        else:
            with torch.no_grad():  # (see above: keeps a ScriptModule's parameters leaves)
                model = copy.deepcopy(encoder)
            for name, p in model.named_parameters():
                p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        model.to(self.device)
        if self._channels_last:
            model.to(memory_format=torch.channels_last)
        # Trainable parameters: the caller's requires_grad choice (all when none is set).
        named = list(model.named_parameters())
        trainable = {n for n, p in named if p.requires_grad and p.is_floating_point()}
        if not trainable:
            warnings.warn("no encoder parameter requires grad; purifying all of them", stacklevel=3)
            trainable = {n for n, p in named if p.is_floating_point()}
        if cfg.bn_policy == "frozen":
            for mname, m in model.named_modules():
                if _is_batchnorm(m):
                    for pname, _ in m.named_parameters(recurse=False):
                        trainable.discard(f"{mname}.{pname}" if mname else pname)
        if not trainable:
            raise ValueError("no parameter left to train (bn_policy='frozen' on a BatchNorm-only encoder?)")
        for n, p in named:
            p.requires_grad_(n in trainable)
            p.grad = None
        self.model = model
        self.fingerprint = ckpt.model_fingerprint(model)
        self._features = _Features(model, feature_fn)
        if self._dist.enabled:
            net = self._dist.call("wrap_model", model, self._dist.ctx, cfg, feature_fn)
            self._net = net
            self._train_forward: Callable[[torch.Tensor], torch.Tensor] = lambda x: _flatten_features(
                net(x), x.shape[0]
            )
        else:
            self._net = model
            self._train_forward = self._features
        if cfg.compile:
            self._train_forward = torch.compile(self._train_forward)
        params = [p for n, p in model.named_parameters() if n in trainable]
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.optimizer = opt
        epochs, cosine = cfg.epochs, cfg.lr_schedule == "cosine"
        # lr factor of epoch e (0-based): 1 (constant) or 0.5 * (1 + cos(pi * e / epochs)) (cosine).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs)) if cosine else 1.0
        )
        self._epoch = 0
        self._step_count = 0
        self._prepared = True

    # ------------------------------------------------------------------ one batch
    def step(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One full CBD step on a batch already on the device (after :meth:`prepare`).

        Args:
            x: [B, C, H, W] float images in [0, 1] on the run's device (B >= 2 across ranks).
            indices: optional [B] int64 sample indices (keys of the per-sample random starts); by
                default consecutive numbers continuing from the previous step.

        Returns:
            on-device 0-dim tensors (no host sync, except with ``nonfinite="skip"``): ``loss``,
            ``loss_pull``, ``loss_clean``, ``attack_loss`` (float32), ``finite`` (bool),
            ``skipped`` and ``clipped`` (float32 0/1: the spike guard scaled this step's gradient).
        """
        if not self._prepared:
            raise RuntimeError("call Purifier.prepare(encoder) before step(x)")
        if indices is None:
            b = x.shape[0]
            start = self._step_count * b
            indices = torch.arange(start, start + b, dtype=torch.int64, device=x.device)
        try:
            out = self._run_step(x, indices, self._epoch)
        except _NonFinite as e:
            raise RuntimeError(
                f"non-finite loss ({e}) at step {self._step_count}; set nonfinite='skip' to skip such batches"
            ) from None
        self._step_count += 1
        return out

    def _set_finetune_mode(self) -> None:
        self.model.train()
        if self.config.bn_policy in ("eval", "frozen"):
            for m in self.model.modules():
                if _is_batchnorm(m):
                    m.eval()

    def _run_step(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        b = x.shape[0]
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if cfg.augmentation != "none":
            u = per_sample_uniform(indices, (3,), seed=cfg.seed, epoch=epoch, stream=1)
            x = augment(x, cfg.augmentation, cfg.crop_padding, u)
        # 1. Clean anchors, once per batch: eval mode, no gradient, global across ranks.
        with torch.no_grad(), _eval_mode(self._features), self._autocast():
            anchors = self._dist.gather_no_grad(self._features(x).float())
        # 2. The adversary (eval mode and input-only gradients inside).
        with self._autocast():
            x_adv = self._adversary(
                AttackInputs(
                    encoder=self._features,
                    x=x,
                    clean_features=anchors,
                    indices=indices,
                    epoch=epoch,
                    gather=self._dist.gather_local_grad if self._dist.enabled else None,
                    config=cfg,
                    rank=self._dist.ctx.rank if self._dist.enabled else 0,
                )
            )
        # 3. Fine-tune: one forward of [x_adv; x; extra clean views], pulling + clean term.
        self._set_finetune_mode()
        term = self._clean_term
        with self._autocast():
            views = term.views(x, indices, epoch)
            parts = [x_adv.to(x.dtype), x] + ([views] if views is not None else [])
            z = self._train_forward(torch.cat(parts)).float()
            z_adv, z_clean, z_views = z[:b], z[b : 2 * b], (z[2 * b :] if views is not None else None)
            pull = self._nt_xent(self._dist.gather_with_grad(z_adv), self._dist.gather_with_grad(z_clean))
            with torch.no_grad():
                attack_loss = self._nt_xent(self._dist.gather_no_grad(z_adv.detach()), anchors)
            ref = self._reference
            clean = term(
                CleanTermInputs(
                    x=x,
                    z_clean=z_clean,
                    z_adv=z_adv,
                    z_views=z_views,
                    indices=indices,
                    epoch=epoch,
                    features=self._train_forward,
                    reference_features=(lambda imgs: _no_grad_call(ref, imgs)) if ref is not None else None,
                    gather=self._dist.gather_with_grad,
                    gather_no_grad=self._dist.gather_no_grad,
                    config=cfg,
                )
            )
        if clean is None:
            clean = torch.zeros((), device=z.device)
            loss = pull
        else:
            clean = clean.float()
            loss = pull + cfg.clean_weight * clean
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = torch.isfinite(loss)
        clipped = self._clip_gradient_spike()
        skipped = torch.zeros((), device=z.device)
        if cfg.nonfinite == "skip":
            if bool(finite):  # one host sync per batch: the price of skipping
                self.optimizer.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
                skipped = torch.ones((), device=z.device)
        else:
            if self.device.type == "cpu" and not bool(finite):  # free on CPU: stop before the update
                raise _NonFinite(f"{float(loss.detach())}")
            self.optimizer.step()
        return {
            "loss": loss.detach(),
            "loss_pull": pull.detach(),
            "loss_clean": clean.detach(),
            "attack_loss": attack_loss.detach(),
            "finite": finite,
            "skipped": skipped,
            "clipped": clipped,
        }

    def _clip_gradient_spike(self) -> torch.Tensor:
        """Scale the gradients down to ``grad_spike_factor`` x the running mean of earlier norms.

        ``n = ||g||_2`` over every parameter; ``c = min(1, factor * ema / n)``; ``g <- c g``;
        ``ema <- 0.9 ema + 0.1 c n``. The first ``_SPIKE_WARMUP`` (3) steps only set ``ema`` (their
        mean): the first step's gradient is small by construction, a limit from it alone clipped
        ordinary steps. On the device, no host
        sync; a multiplication by exactly 1 leaves the gradients bit-identical, so a run whose norms
        never spike is the unclipped run. Non-finite norms are left to the ``nonfinite`` policy.
        Returns 1.0 when this batch was clipped, else 0.0 (a 0-d float32 tensor on the device).
        """
        factor = self.config.grad_spike_factor
        dev = self.device
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if factor is None or not grads:
            return torch.zeros((), device=dev)
        # one fused pass per dtype group where torch has it (as clip_grad_norm_ does), else a loop
        foreach = hasattr(torch, "_foreach_norm") and len({(g.device, g.dtype) for g in grads}) == 1
        if foreach:
            norms = [n.float() for n in torch._foreach_norm(grads)]
        else:
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        ok = torch.isfinite(norm)
        self._grad_steps += 1
        if self._grad_ema is None or self._grad_steps <= _SPIKE_WARMUP:
            # warm-up: a plain mean of the first norms, no clipping (the first step's gradient is
            # small by construction: the encoder still equals the frozen original)
            prev = torch.zeros_like(norm) if self._grad_ema is None else self._grad_ema
            k = min(self._grad_steps, _SPIKE_WARMUP)
            self._grad_ema = torch.where(ok, prev + (norm - prev) / k, prev)
            return torch.zeros((), device=dev)
        ema = self._grad_ema
        limit = torch.where(ema > 0, factor * ema, torch.full_like(ema, float("inf")))
        c = torch.where(ok & (norm > limit), limit / norm.clamp_min(1e-30), torch.ones_like(norm))
        # c is exactly 1 unless clipped: the gradients stay bit-identical
        if foreach:
            torch._foreach_mul_(grads, c.to(grads[0].dtype))
        else:
            for g in grads:
                g.mul_(c.to(g.dtype))
        self._grad_ema = torch.where(ok, 0.9 * ema + 0.1 * c * norm, ema)
        return (c < 1).float()

    def _nt_xent(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from cbd_fast.ops import nt_xent

        return nt_xent(a, b, self.config.temperature, backend=self.config.backend)

    # ------------------------------------------------------------------ the run
    def fit(
        self, encoder: nn.Module, data: Any, feature_fn: FeatureFn | None = None, *, inplace: bool = False
    ) -> PurifyResult:
        """Purify ``encoder`` on unlabeled ``data``.

        Args:
            encoder: a ``nn.Module`` mapping float images [B, C, H, W] in [0, 1] to features [B, D]
                (or [B, ...], flattened); with ``feature_fn``, any module (e.g. a classifier).
            data: a Tensor [N, C, H, W] (float in [0, 1] or uint8, scaled by 1/255), a Dataset whose
                items are an image tensor [C, H, W] or a tuple/list/dict holding one (first element /
                ``"image"``), or a DataLoader used as is. Labels are never read.
            feature_fn: optional ``feature_fn(module, x) -> features``, e.g. ``lambda m, x: m.features(x)``.
            inplace: purify ``encoder`` itself instead of a copy.

        Returns:
            a :class:`PurifyResult` (``encoder``, per-epoch ``history``, ``config``).

        Raises:
            TypeError / ValueError: bad encoder, data or feature output, raised before any training.
            RuntimeError: a non-finite loss with ``nonfinite="stop"`` (names the epoch and batch).
            cbd_fast.core.checkpoint.CheckpointError: resuming from a checkpoint of another model or config.
        """
        self._check_encoder(encoder, feature_fn, inplace)
        self._setup_context()
        # All randomness (data loader seeds, dropout) comes from a fork of torch's RNG seeded with
        # config.seed; the caller's RNG state is restored on the way out.
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices, device_type=self.device.type):
            torch.random.default_generator.manual_seed(self.config.seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(self.config.seed)
            return self._fit(encoder, data, feature_fn, inplace)

    def _fit(
        self, encoder: nn.Module, data: Any, feature_fn: FeatureFn | None, inplace: bool
    ) -> PurifyResult:
        cfg = self.config
        first = next(p for p in encoder.parameters() if p.is_floating_point())
        sampler = self._make_sampler(data)
        stream = ImageStream(
            data,
            batch_size=self.local_batch_size,
            seed=cfg.seed,
            device=self.device,
            dtype=first.dtype,
            num_workers=cfg.num_workers,
            sampler=sampler,
        )
        probe = stream.first_batch()
        self._setup_model(encoder, feature_fn, inplace)
        self._probe(probe)
        history: list[dict[str, float]] = []
        start_epoch = 0
        ctx = self._dist.ctx
        with self._dist.run_guard():
            last_ckpt = None
            if cfg.checkpoint_dir is not None and cfg.resume:
                found = ckpt.load_latest(cfg.checkpoint_dir)
                if found is not None:
                    last_ckpt, state = found
                    start_epoch, history = self._restore(state, last_ckpt, stream)
            for epoch in range(start_epoch, cfg.epochs):
                self._epoch = epoch
                history.append(self._run_epoch(stream, epoch, last_ckpt))
                self.scheduler.step()
                if cfg.checkpoint_dir is not None and ctx.is_main:
                    last_ckpt = ckpt.save_checkpoint(
                        cfg.checkpoint_dir, epoch + 1, self._state(history, stream), keep=cfg.keep_checkpoints
                    )
        return PurifyResult(encoder=self._finish(), history=history, config=cfg)

    def _make_sampler(self, data: Any) -> Any:
        if isinstance(data, torch.utils.data.DataLoader):
            return None
        if not (isinstance(data, torch.Tensor) or hasattr(data, "__len__")):
            return None  # ImageStream raises the clear error
        mod = self._dist.mod
        if mod is not None and hasattr(mod, "make_sampler") and hasattr(data, "__len__"):
            try:
                n = len(data)
            except TypeError:
                return None
            if n < 2:
                return None
            return mod.make_sampler(
                data, self._dist.ctx, shuffle=True, seed=self.config.seed, drop_last=False
            )
        return EpochShuffleSampler(len(data), self.config.seed)  # pragma: no cover

    def _probe(self, images: torch.Tensor) -> None:
        """One eval-mode, no-grad forward on a few first-batch images: features must be finite [B, D]."""
        x = images[: min(images.shape[0], 8)].to(self.device)
        x = x.to(self.dtype).div_(255.0) if x.dtype == torch.uint8 else x.to(self.dtype)
        with torch.no_grad(), _eval_mode(self._features), self._autocast():
            z = self._features(x)
        if z.shape[1] < 1:
            raise ValueError(f"the encoder returned empty features; got shape {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError(
                "the encoder returned non-finite features (NaN/Inf) on the first batch of clean images; "
                "purify needs an encoder that works on the data"
            )

    def _run_epoch(self, stream: ImageStream, epoch: int, last_ckpt: Any) -> dict[str, float]:
        cfg = self.config
        n_batches = stream.batches_per_epoch()
        dev = self.device
        acc = torch.zeros(len(_HISTORY_TERMS), device=dev, dtype=torch.float64)
        weight = torch.zeros((), device=dev, dtype=torch.float64)
        skipped = torch.zeros((), device=dev)
        clipped = torch.zeros((), device=dev)
        first_bad = torch.full((), -1, device=dev, dtype=torch.int64)
        bad_data = torch.full((), -1, device=dev, dtype=torch.int64)
        images = dropped = batches = 0
        lr = self.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        bar = self._bar(n_batches, epoch)
        where = f"epoch {epoch + 1}/{cfg.epochs}"

        def nonfinite_error(b: int) -> RuntimeError:
            kept = (
                f"the last good checkpoint {last_ckpt} is intact"
                if last_ckpt
                else "no checkpoint was written yet"
            )
            total = f"/{n_batches}" if n_batches else ""
            return RuntimeError(
                f"non-finite loss at {where}, batch {b + 1}{total}: purification stopped ({kept}); "
                "lower lr/epsilon, check the encoder, or set nonfinite='skip' to skip such batches"
            )

        def sync(b: int) -> torch.Tensor:
            if int(bad_data) >= 0:
                raise ValueError(
                    f"data batch {int(bad_data)} of epoch {epoch + 1} has values outside [0, 1] or NaN/Inf"
                )
            if int(first_bad) >= 0:
                raise nonfinite_error(int(first_bad))
            return (acc / weight.clamp_min(1)).cpu()

        try:
            for b, (x, idx) in enumerate(stream.epoch(epoch)):
                if x.shape[0] * self._world < 2:  # NT-Xent needs a negative: drop a final single image
                    dropped += 1
                    continue
                if dev.type != "cpu" and x.is_floating_point():
                    ok = ((x >= 0) & (x <= 1)).all()  # NaN fails both comparisons
                    bad_data = torch.where(~ok & (bad_data < 0), torch.full_like(bad_data, b), bad_data)
                try:
                    out = self._run_step(x, idx, epoch)
                except _NonFinite:
                    raise nonfinite_error(b) from None
                n = x.shape[0] * self._world
                vals = torch.stack([out[k] for k in _HISTORY_TERMS]).double()
                keep = (1.0 - out["skipped"]).double() * n
                acc += vals * keep
                weight += keep
                skipped += out["skipped"]
                clipped += out["clipped"]
                if cfg.nonfinite == "stop":
                    first_bad = torch.where(
                        ~out["finite"] & (first_bad < 0), torch.full_like(first_bad, b), first_bad
                    )
                images += n
                batches += 1
                bar.update(1)
                if (b + 1) % cfg.log_every == 0:
                    _show_postfix(bar, sync(b), images / max(time.perf_counter() - t0, 1e-9))
            means = sync(batches)
            if batches:
                _show_postfix(bar, means, images / max(time.perf_counter() - t0, 1e-9))
        finally:
            bar.close()
        if batches == 0:
            raise ValueError(f"data yielded no usable batch in {where} (batches need >= 2 images)")
        seconds = time.perf_counter() - t0
        entry: dict[str, float] = {"epoch": epoch + 1}
        entry.update({k: float(v) for k, v in zip(_HISTORY_TERMS, means.tolist())})
        entry.update(
            lr=float(lr),
            images=images,
            batches=batches,
            skipped_batches=int(skipped),
            clipped_batches=int(clipped),
            dropped_batches=dropped,
            seconds=seconds,
            images_per_s=images / max(seconds, 1e-9),
        )
        return entry

    def _bar(self, total: int | None, epoch: int) -> Any:
        disable = not (self.config.progress and self._dist.ctx.is_main)
        desc = f"purify {epoch + 1}/{self.config.epochs}"
        try:
            from cbd_fast.core.progress import progress
        except ImportError:  # pragma: no cover
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="batch", disable=disable, leave=False)
        return progress(total=total, desc=desc, unit="batch", disable=disable)

    # ------------------------------------------------------------------ checkpoints
    def _state(self, history: list[dict[str, float]], stream: ImageStream) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "loader": stream.generator_states()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": 1,
            "epoch": len(history),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "adversary": self._adversary.state_dict(),
            "grad_ema": None if self._grad_ema is None else self._grad_ema.detach().cpu(),
            "grad_steps": self._grad_steps,
            "history": history,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
        }

    def _restore(
        self, state: dict[str, Any], path: Any, stream: ImageStream
    ) -> tuple[int, list[dict[str, float]]]:
        if state.get("format") != 1:
            raise ckpt.CheckpointError(f"{path} has an unknown checkpoint format {state.get('format')!r}")
        if state.get("fingerprint") != self.fingerprint:
            raise ckpt.CheckpointError(
                f"{path} was written for another model (architecture fingerprint {state.get('fingerprint')} "
                f"!= {self.fingerprint} of this encoder: different parameter names or shapes)"
            )
        saved, now = state.get("config", {}), self.config.to_dict()
        diff = sorted(
            k for k in now if k not in PurifyConfig.RESUME_SAFE_FIELDS and saved.get(k, now[k]) != now[k]
        )
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diff)
            raise ckpt.CheckpointError(
                f"{path} was written with another config ({detail}); resume needs the same"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ema = state.get("grad_ema")
        self._grad_ema = None if ema is None else ema.to(self.device)
        self._grad_steps = int(state.get("grad_steps", 0 if ema is None else _SPIKE_WARMUP))
        if "adversary" in state:
            self._adversary.load_state_dict(state["adversary"])
        elif self._adversary.state_dict():
            warnings.warn(
                f"{path} holds no state of the adversary {self.config.adversary!r} (written by an older "
                "version): it starts afresh, so the run will not equal an uninterrupted one",
                RuntimeWarning,
                stacklevel=3,
            )
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        stream.set_generator_states(rng.get("loader", {}))
        return int(state["epoch"]), list(state["history"])

    # ------------------------------------------------------------------ hand-back
    def _finish(self) -> nn.Module:
        """Undo the run's changes to the module's flags, wrappers and placement; return it."""
        model = self.model
        if self._dist.enabled and hasattr(self._dist.mod, "unwrap_model"):
            model = self._dist.call("unwrap_model", self._net)
        for name, m in model.named_modules():
            if name in self._flags:
                m.training = self._flags[name]
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
            p.grad = None
        if self._channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.to(self._orig_device)
        self._prepared = False
        return model


def _no_grad_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x).float()


def purify(
    encoder: nn.Module,
    data: Any,
    config: PurifyConfig | dict[str, Any] | None = None,
    *,
    feature_fn: FeatureFn | None = None,
    inplace: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Purify a possibly backdoored backbone without labels (Contrastive Backdoor Defense).

    Args:
        encoder: ``nn.Module`` mapping float images [B, C, H, W] in [0, 1] to features [B, D] (or
            [B, ...], flattened). For a classifier pass its backbone, or the whole classifier with
            ``feature_fn``.
        data: unlabeled images: a Tensor [N, C, H, W] (float in [0, 1], or uint8 scaled by 1/255), a
            Dataset whose items are an image tensor or a tuple/list/dict holding one (first element /
            ``"image"`` key), or a DataLoader (used as is). Labels are never read. N >= 2.
        config: a :class:`PurifyConfig`, a dict of its fields, or None (defaults).
        feature_fn: optional ``feature_fn(module, x) -> features``, e.g. ``lambda m, x: m.features(x)``.
        inplace: purify ``encoder`` itself (its parameters and buffers change) instead of a copy.
        **overrides: PurifyConfig fields, e.g. ``epochs=3, lr=0.005`` (unknown names -> TypeError
            listing the valid ones).

    Returns:
        the purified module: a deep copy of ``encoder`` (same class) unless ``inplace=True``; the
        caller's module, parameters, buffers, flags, requires_grad and ``.grad`` are untouched.

    Example:
        >>> import torch, cbd_fast
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten())
        >>> images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
        >>> clean = cbd_fast.purify(backbone, images, epochs=1, batch_size=16, progress=False)
        >>> type(clean) is type(backbone) and clean is not backbone
        True
    """
    return Purifier(config, **overrides).fit(encoder, data, feature_fn=feature_fn, inplace=inplace).encoder


def _show_postfix(bar: Any, means: Any, rate: float) -> None:
    """Progress-bar postfix: running means of (loss, pull, clean, attack) and images/s."""
    bar.set_postfix(
        loss=f"{means[0]:.4f}",
        pull=f"{means[1]:.4f}",
        clean=f"{means[2]:.4f}",
        attack=f"{means[3]:.4f}",
        img_s=f"{rate:.1f}",
    )
