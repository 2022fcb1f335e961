"""``purify`` and ``Purifier``: the whole Contrastive Backdoor Defense loop behind one call.

The method is described in ``docs/method.md``. The pieces: ``prepare.py`` sets the run up
(device, precision, working copy, frozen original, optimiser), ``step.py`` is one CBD step,
``epoch.py`` one epoch, ``run_state.py`` the checkpointed state, ``spike_guard.py`` the gradient
spike guard; this module orchestrates them.

Reproducibility: the data order is a pure function of (seed, epoch), the random starts of (seed,
epoch, sample index); dropout uses torch's global RNG forked from ``seed`` (the caller's RNG state
is restored afterwards) and saved in checkpoints, as is the adversary's state across batches, so a
resumed run ends with exactly the weights of an uninterrupted one (CPU, same seed), and two runs
with one seed give identical weights. Python's ``random`` and NumPy are not used by the loop. A
DataLoader passed by the caller keeps its own order (seed it with its ``generator``, whose state
the checkpoints keep); its images have no dataset indices, so their random starts are keyed by
their position in the epoch instead.

Example:
    >>> import torch, cbd_fast
    >>> enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    >>> x = torch.rand(16, 1, 8, 8)
    >>> clean = cbd_fast.purify(enc, x, epochs=1, batch_size=8, progress=False)
    >>> clean is enc
    False
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbd_fast.core import checkpoint as ckpt
from cbd_fast.core import distributed as dist
from cbd_fast.core.backbones import (
    auto_feature_fn,
    describe_features,
    standardisation_hint,
    with_standardisation,
)
from cbd_fast.core.config import PurifyConfig
from cbd_fast.core.epoch import run_epoch
from cbd_fast.core.features import FeatureFn, flatten_features
from cbd_fast.core.heads import HeadSpec, check_head_argument
from cbd_fast.core.health import check_health, make_health_check
from cbd_fast.core.inputs import ImageStream, MappedSampler, holdout_split, images_at
from cbd_fast.core.modes import eval_mode
from cbd_fast.core.prepare import (
    Run,
    check_encoder,
    finish_run,
    make_context,
    prepare_run,
    use_contiguous,
)
from cbd_fast.core.reference_cache import ReferenceCache, build_reference_cache, cache_policy
from cbd_fast.core.run_state import capture_state, restore_state
from cbd_fast.core.step import NonFiniteLoss, cbd_step

__all__ = ["purify", "Purifier", "PurifyResult", "FeatureFn"]

logger = logging.getLogger("cbd_fast.core.purify")
#: warnings already shown in this process (each is shown once)
_WARNED: set[str] = set()


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
            (non-finite, with ``nonfinite="skip"``), ``clipped_batches`` (scaled by the spike guard),
            ``dropped_batches`` (a last batch of 1 image), ``seconds`` and ``images_per_s``. Epochs
            restored from a checkpoint are included. ``steps`` holds the losses per logged step:
            one dict per ``log_every`` batches and one for the epoch's last batches (``epoch``,
            ``batch``: usable batches done in the epoch, ``batches`` and ``images`` in the window, the
            means of ``loss``, ``loss_pull``, ``loss_clean``, ``attack_loss`` over the window,
            ``seconds`` since the epoch started, ``images_per_s`` of the window).
        config: the validated config used.
        features: what the features were, e.g. ``"timm forward_features + avg pool, 768-d"``
            (:func:`cbd_fast.core.backbones.describe_features`).
        head: the head whose changed predictions the health check measured
            (``health_head_change``), e.g. ``"timm ResNet get_classifier()"``; None without one.
        runtime: where and how it ran: ``device``, ``amp_dtype`` (the autocast dtype or
            ``"float32"``), ``channels_last``, ``world_size``, ``backend_requested`` (``"auto"`` or
            the config's), ``backends`` (per op, the backend float32 calls start with there; one
            that fails at launch falls back at run time), ``backends_available``, ``extension``
            (``"loaded"`` or why not), and the loss weights used, ``head_weight`` and
            ``clean_weight`` (the config's ``"auto"`` resolved: ``PurifyConfig.loss_weights``).
    """

    encoder: nn.Module
    history: list[dict[str, float]]
    config: PurifyConfig
    features: str | None = None
    runtime: dict[str, Any] | None = None
    head: str | None = None


def _run_feature_fn(
    encoder: nn.Module, feature_fn: FeatureFn | None, config: PurifyConfig
) -> FeatureFn | None:
    """What the run calls for features: ``feature_fn``, else the automatic choice of the model's
    family (timm / torchvision / transformers: their pre-logits features), behind the input
    standardisation of ``config.input_mean`` / ``input_std`` when set (an identity one is skipped).
    Without one, a model that declares the standardisation it expects gets a warning."""
    if feature_fn is None:
        feature_fn = auto_feature_fn(encoder)
    if config.input_mean is None:
        hint = standardisation_hint(encoder)
        if hint is not None:
            logger.warning(hint)
    return with_standardisation(feature_fn, config.input_mean, config.input_std)


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
        ['attack_loss', 'batches', 'clipped_batches']
    """

    def __init__(self, config: PurifyConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        if config is None:
            config = PurifyConfig()
        elif isinstance(config, dict):
            config = PurifyConfig.from_dict(config)
        elif not isinstance(config, PurifyConfig):
            raise TypeError(f"config must be a PurifyConfig, a dict or None; got {type(config).__name__}")
        self.config = config.replace(**overrides)  # a validated copy: the caller's object is not touched
        self._run: Run | None = None
        self._epoch = 0
        self._step_count = 0

    # ------------------------------------------------------------------ one batch at a time
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
        check_encoder(encoder, feature_fn, inplace)
        if self.config.head_term_required:
            raise ValueError(
                f"head_weight={self.config.head_weight} needs the head, which fit(..., head=...) resolves; "
                "prepare / step take none: use fit, or head_weight=0"
            )
        feature_fn = _run_feature_fn(encoder, feature_fn, self.config)
        ctx = make_context(self.config)
        _warn_if_slow(ctx, self.config)
        self._run = prepare_run(self.config, ctx, encoder, feature_fn, inplace)
        self._epoch = self._step_count = 0
        return self._run.model

    @property
    def model(self) -> nn.Module:
        """The module being purified (after :meth:`prepare`)."""
        return self._prepared().model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The run's optimiser (after :meth:`prepare`)."""
        return self._prepared().optimizer

    @property
    def device(self) -> torch.device:
        """The run's device (after :meth:`prepare`)."""
        return self._prepared().ctx.device

    def _prepared(self) -> Run:
        if self._run is None:
            raise RuntimeError("call Purifier.prepare(encoder) before step(x)")
        return self._run

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
        run = self._prepared()
        if indices is None:
            b = x.shape[0]
            start = self._step_count * b
            indices = torch.arange(start, start + b, dtype=torch.int64, device=x.device)
        try:
            out = cbd_step(run, x, indices, self._epoch)
        except NonFiniteLoss as e:
            raise RuntimeError(
                f"non-finite loss ({e}) at step {self._step_count}; set nonfinite='skip' to skip such batches"
            ) from None
        self._step_count += 1
        return out

    # ------------------------------------------------------------------ the run
    def fit(
        self,
        encoder: nn.Module,
        data: Any,
        feature_fn: FeatureFn | None = None,
        *,
        inplace: bool = False,
        head: HeadSpec = None,
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
            head: the head that reads the features, for the health check's changed predictions
                (``health_head_change``): None, the model's own classifier when it is a timm,
                torchvision or Hugging Face classifier whose head verifiably reads these features;
                a submodule name (verified); a callable ``features [B, D] -> logits [B, K]`` (used as
                given, never modified); False, none (``cbd_fast.core.heads``).

        Returns:
            a :class:`PurifyResult` (``encoder``, per-epoch ``history``, ``config``).

        Raises:
            TypeError / ValueError: bad encoder, data or feature output, raised before any training.
            RuntimeError: a non-finite loss with ``nonfinite="stop"`` (names the epoch and batch).
            cbd_fast.core.checkpoint.CheckpointError: resuming from a checkpoint of another model or
                config.
        """
        check_encoder(encoder, feature_fn, inplace)
        check_head_argument(head)
        feature_fn = _run_feature_fn(encoder, feature_fn, self.config)
        ctx = make_context(self.config)
        _warn_if_slow(ctx, self.config)
        # All randomness (data loader seeds, dropout) comes from a fork of torch's RNG seeded with
        # config.seed; the caller's RNG state is restored on the way out.
        rng_devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices, device_type=ctx.device.type):
            torch.random.default_generator.manual_seed(self.config.seed)
            if ctx.device.type == "cuda":
                torch.cuda.manual_seed(self.config.seed)
            return self._fit(ctx, encoder, data, feature_fn, inplace, head)

    def _fit(
        self,
        ctx: Any,
        encoder: nn.Module,
        data: Any,
        feature_fn: FeatureFn | None,
        inplace: bool,
        head: HeadSpec,
    ) -> PurifyResult:
        cfg = self.config
        first = next(p for p in encoder.parameters() if p.is_floating_point())
        held, train = _holdout(data, cfg)
        stream = ImageStream(
            data,
            batch_size=ctx.local_batch_size,
            seed=cfg.seed,
            device=ctx.device,
            dtype=first.dtype,
            num_workers=cfg.num_workers,
            sampler=_sampler(data, ctx.dist, cfg.seed, train),
        )
        probe = stream.first_batch()
        run = self._run = prepare_run(cfg, ctx, encoder, feature_fn, inplace)
        dim = _probe_layout(run, probe)
        features = describe_features(feature_fn, dim)
        logger.info("features: %s", features)
        health = None
        if cfg.health != "off":  # the original's features, before any change (and before a resume)
            images = images_at(data, held) if held else probe[: cfg.health_images]
            # 3 images at least: a neighbour and more
            health = make_health_check(run, images, head) if len(images) >= 3 else None
        run.set_head(None if health is None else health.head)
        logger.info("loss weights: head term %g, clean term %g", run.head_weight, run.clean_weight)
        if cfg.head_term_required and run.head is None:
            raise ValueError(
                f"head_weight={cfg.head_weight} needs the head that reads the features: pass "
                "purify(..., head=...) (and keep health on); none was given or verified"
            )
        history: list[dict[str, float]] = []
        start_epoch = 0
        with dist.run_guard(ctx.dist):
            run.reference_cache = _reference_cache(run, stream, data, train, dim)
            last_ckpt = None
            if cfg.checkpoint_dir is not None and cfg.resume:
                found = ckpt.load_latest(cfg.checkpoint_dir)
                if found is not None:
                    last_ckpt, state = found
                    start_epoch, history = restore_state(run, state, last_ckpt, stream)
            for epoch in range(start_epoch, cfg.epochs):
                self._epoch = epoch
                entry = run_epoch(run, stream, epoch, last_ckpt)
                if health is not None:
                    entry.update(check_health(run, health, epoch, last_ckpt, held=bool(held)))
                history.append(entry)
                run.scheduler.step()
                if cfg.checkpoint_dir is not None and ctx.dist.is_main:
                    last_ckpt = ckpt.save_checkpoint(
                        cfg.checkpoint_dir,
                        epoch + 1,
                        capture_state(run, history, stream),
                        keep=cfg.keep_checkpoints,
                    )
        self._run = None
        return PurifyResult(
            encoder=finish_run(run),
            history=history,
            config=cfg,
            features=features,
            runtime={**_runtime(ctx, cfg), "head_weight": run.head_weight, "clean_weight": run.clean_weight},
            head=None if health is None or health.head is None else health.head.source,
        )


def _reference_cache(
    run: Run, stream: ImageStream, data: Any, train: list[int] | None, dim: int
) -> ReferenceCache | None:
    """The frozen original's features (``dim`` wide) per training index, when
    ``config.reference_cache`` allows."""
    n = _size(data)
    if run.reference is None or n is None:
        cache_policy(run.config, data, n, 0, run.ctx.device)  # the clear error for True
        return None
    ids = list(range(n)) if train is None else train
    if not cache_policy(run.config, data, n, dim, run.ctx.device):
        return None
    return build_reference_cache(
        run.reference,
        stream.images,
        ids,
        n,
        run.ctx.local_batch_size,
        run.ctx.device,
        run.ctx.dist,
        run.ctx.autocast,
    )


def _size(data: Any) -> int | None:
    """The number of images of a Tensor or sized Dataset (None: a DataLoader or unsized data)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return None
    if not (isinstance(data, torch.Tensor) or hasattr(data, "__len__")):
        return None  # ImageStream raises the clear error
    try:
        return len(data)
    except TypeError:
        return None


def _holdout(data: Any, cfg: PurifyConfig) -> tuple[list[int], list[int] | None]:
    """(held-out indices for the health check, training indices or None for all)."""
    n = _size(data)
    if cfg.health == "off" or n is None or n < 2:
        return [], None
    held, train = holdout_split(n, cfg.health_images, cfg.seed)
    return held, (train if held else None)


def _sampler(data: Any, ctx: dist.DistContext, seed: int, train: list[int] | None) -> Any:
    """The per-epoch sampler of a sized dataset over its training indices (None: a DataLoader, or
    data ImageStream rejects)."""
    n = _size(data)
    if n is None or n < 2:
        return None
    if train is None:
        return dist.make_sampler(data, ctx, shuffle=True, seed=seed, drop_last=False)
    return MappedSampler(dist.make_sampler(range(len(train)), ctx, shuffle=True, seed=seed), train)


def _probe_layout(run: Run, images: torch.Tensor) -> int:
    """:func:`_probe`, and when channels-last was chosen automatically and the encoder's forward
    refuses it (e.g. a ``.view`` on a permuted tensor), the run goes on in the contiguous format."""
    if not run.ctx.channels_last:
        return _probe(run, images)
    if run.config.channels_last is True:
        try:
            return _probe(run, images)
        except RuntimeError as exc:
            raise RuntimeError(
                f"the encoder's forward failed on channels-last inputs with channels_last=True ({exc}); "
                "set channels_last=False, or 'auto' to fall back by itself"
            ) from exc
    try:
        return _probe(run, images)
    except RuntimeError as exc:
        logger.info("channels_last off: the encoder's forward failed with it (%s)", exc)
        use_contiguous(run)
        return _probe(run, images)


def _probe(run: Run, images: torch.Tensor) -> int:
    """One eval-mode, no-grad forward on a few first-batch images: the features must be one finite
    vector per image ([B, D], or a [B, C, H, W] map, flattened; ``flatten_features(strict=True)``).
    Returns D."""
    x = images[: min(images.shape[0], 8)].to(run.ctx.device)
    x = x.to(run.dtype).div_(255.0) if x.dtype == torch.uint8 else x.to(run.dtype)
    if run.ctx.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # the layout the loop will feed
    with torch.no_grad(), eval_mode(run.features), run.ctx.autocast():
        z = flatten_features(run.features.raw(x), x.shape[0], strict=True)  # one vector per image
    if z.shape[1] < 1:
        raise ValueError(f"the encoder returned empty features; got shape {tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(
            "the encoder returned non-finite features (NaN/Inf) on the first batch of clean images; "
            "purify needs an encoder that works on the data"
        )
    return int(z.shape[1])


def _runtime(ctx: Any, cfg: PurifyConfig) -> dict[str, Any]:
    """``PurifyResult.runtime``: device, precision, world size, op backends (see there)."""
    import importlib

    from cbd_fast.ops import _ext
    from cbd_fast.ops.backends import available_backends, select_backend

    backends: dict[str, str] = {}
    for op, module in (("nt_xent", "cbd_fast.ops.nt_xent"), ("pgd_step", "cbd_fast.ops.pgd")):
        mod = importlib.import_module(module)
        order = getattr(mod, "_ORDER", {}).get(ctx.device.type)
        if op == "nt_xent" and ctx.device.type == "cuda":  # by dtype and 2N: the losses' float32 batch
            order = mod._cuda_order("float32", 2 * cfg.batch_size)
        try:
            backends[op] = select_backend(op, ctx.device, cfg.backend, priority=order)
        except (RuntimeError, ValueError, TypeError) as exc:  # pragma: no cover - the run would have failed
            backends[op] = f"unavailable: {exc}"
    return {
        "device": str(ctx.device),
        "amp_dtype": str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype is not None else "float32",
        "channels_last": bool(ctx.channels_last),
        "world_size": int(ctx.world),
        "backend_requested": cfg.backend or "auto",
        "backends": backends,
        "backends_available": available_backends(ctx.device),
        "extension": "loaded" if _ext.load() is not None else _ext.load_error(),
    }


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, as oneDNN reports it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older torch or a build without oneDNN
        return False


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _warn_if_slow(ctx: Any, cfg: PurifyConfig) -> None:
    """Warn (once per process) when the run will be slower than it could be, unless the user chose
    it: the ops fall back to the pure-PyTorch backend because the compiled kernels cannot run here,
    or bfloat16 autocast is asked for on a CPU without native bfloat16 instructions (emulated)."""
    from cbd_fast.ops.backends import ENV_VAR, backend_status, select_backend

    device = ctx.device
    if cfg.backend is None and not os.environ.get(ENV_VAR, "").strip():
        best = "cuda" if device.type == "cuda" else "cpp"
        reason = backend_status(device).get(best)
        if reason is not None and "CBD_FAST_DISABLE_EXT" not in reason:
            chosen = select_backend("nt_xent", device)
            if chosen == "torch":
                _warn_once(
                    f"backend:{device.type}",
                    f"cbd_fast's {best} kernels cannot run here ({reason}): NT-Xent and PGD fall back to "
                    "the slower pure-PyTorch backend ('python -m cbd_fast.info' says more; reinstall with "
                    "'bash scripts/install.sh' to build the kernels)",
                )
    if device.type == "cpu" and ctx.amp_dtype == torch.bfloat16 and not cpu_has_native_bf16():
        _warn_once(
            "amp:cpu-bf16",
            "amp_dtype='bfloat16' on a CPU without native bfloat16 instructions (AVX512-BF16/AMX): "
            "autocast emulates it, usually slower than float32; set amp_dtype='float32'",
        )


def purify(
    encoder: nn.Module,
    data: Any,
    config: PurifyConfig | dict[str, Any] | None = None,
    *,
    feature_fn: FeatureFn | None = None,
    inplace: bool = False,
    head: HeadSpec = None,
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
        head: the head that reads the features, for the health check's changed predictions: None
            (the model's own classifier when verifiable), a submodule name, a callable ``features
            [B, D] -> logits [B, K]`` (e.g. ``head=model.fc`` when purifying ``model.backbone``), or
            False (see :meth:`Purifier.fit`).
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
    fit = Purifier(config, **overrides).fit(encoder, data, feature_fn=feature_fn, inplace=inplace, head=head)
    return fit.encoder
