"""Clean-behaviour terms (CBD step 4): what keeps the clean features from drifting while pulling.

A small registry: ``PurifyConfig.clean_term`` names an entry of :data:`CLEAN_TERMS`; the loop adds
``config.clean_weight * term(inputs)`` to the pulling loss. Adding a candidate is one class:

    >>> from cbd_fast.core.clean_terms import CleanTerm, register_clean_term
    >>> @register_clean_term("feature_l2")                                   # doctest: +SKIP
    ... class FeatureL2(CleanTerm):
    ...     needs_reference = True
    ...     def __call__(self, inp):
    ...         z0 = inp.gather_no_grad(inp.reference_features(inp.x))
    ...         return (inp.gather(inp.z_clean) - z0).pow(2).mean()

Each term receives a :class:`CleanTermInputs` (the clean batch, the features the fine-tune forward
already computed, the frozen original's features on demand) and returns a 0-dim float32 loss, or
None when it adds nothing. A term that needs features of extra images (augmented views) returns them
from :meth:`CleanTerm.views`: they join the one fine-tune forward (DDP-safe, one pass). Terms never
read labels; all randomness comes from ``per_sample_uniform`` so runs and resumes are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cbd_fast.core.registry import instantiate, registrar
from cbd_fast.core.rng import per_sample_uniform

__all__ = [
    "CleanTermInputs",
    "CleanTerm",
    "CLEAN_TERMS",
    "register_clean_term",
    "make_clean_term",
    "augment",
]


@dataclass
class CleanTermInputs:
    """What a clean term may use, for one batch of the fine-tune step.

    Attributes:
        x: [B, C, H, W] float clean images in [0, 1] on the device (after ``config.augmentation``).
        z_clean: [B, D] float32 features f_theta(x) from the fine-tune forward (carries gradient).
        z_adv: [B, D] float32 features f_theta(x_adv) from the same forward (carries gradient).
        z_views: [V, D] float32 features of the images the term's :meth:`CleanTerm.views` returned,
            computed in the same forward (carries gradient); None when it returned None.
        indices: [B] int64 sample indices (keys for per-sample randomness, see
            ``cbd_fast.core.rng.per_sample_uniform``).
        epoch: 0-based epoch.
        features: images -> [B', D] float32 features of the model being fine-tuned, with gradient, in
            an extra forward (prefer :meth:`CleanTerm.views`: an extra forward does not work under DDP).
        reference_features: images -> [B', D] float32 features of the FROZEN original encoder (eval
            mode, no gradient); None unless the term's class sets ``needs_reference = True``.
        gather: [B, D] -> [B_global, D] all-gather whose backward sums over ranks (identity in one
            process): apply it to features with gradient before a batch-wide loss.
        gather_no_grad: the same for constants (no gradient path).
        config: the run's PurifyConfig.
        adv_rows: [M] int64 positions of ``x`` whose adversarial features ``z_adv`` holds, in order
            (``adv_fraction < 1``); None: every image, ``z_adv`` [B, D] row-aligned with ``x``.
        gather_adv: all-gather of [M, D] rows of the attacked images (ranks may hold different M),
            gradient summed over ranks like ``gather``; None: ``gather``.
        gather_adv_no_grad: the same for constants; None: ``gather_no_grad``.
    """

    x: torch.Tensor
    z_clean: torch.Tensor
    z_adv: torch.Tensor
    z_views: torch.Tensor | None
    indices: torch.Tensor
    epoch: int
    features: Callable[[torch.Tensor], torch.Tensor]
    reference_features: Callable[[torch.Tensor], torch.Tensor] | None
    gather: Callable[[torch.Tensor], torch.Tensor]
    gather_no_grad: Callable[[torch.Tensor], torch.Tensor]
    config: Any  # the run's PurifyConfig
    adv_rows: torch.Tensor | None = None
    gather_adv: Callable[[torch.Tensor], torch.Tensor] | None = None
    gather_adv_no_grad: Callable[[torch.Tensor], torch.Tensor] | None = None

    def adversarial_pairs(self, z0_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global adversarial features [M_g, D] with gradient, the same rows of ``z0_local`` [B, D]
        gathered as constants): the attacked images' rows, whatever ``adv_fraction``."""
        g = self.gather_adv or self.gather
        g0 = self.gather_adv_no_grad or self.gather_no_grad
        z0 = z0_local if self.adv_rows is None else z0_local.index_select(0, self.adv_rows)
        return g(self.z_adv), g0(z0)


class CleanTerm:
    """Base class of a clean-behaviour term.

    Class attributes:
        name: the registry key (set by :func:`register_clean_term`).
        needs_reference: True when the term compares against the frozen original encoder; the loop
            then keeps a frozen copy of it on the device (one extra no-grad forward per batch).
    """

    name: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def views(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """Extra images [V, C, H, W] to run through the fine-tune forward with [x_adv; x] (their
        features arrive as ``inputs.z_views``); None (the default) for none."""
        return None

    def __call__(self, inp: CleanTermInputs) -> torch.Tensor | None:  # pragma: no cover - abstract
        """The unweighted term: a 0-dim float32 tensor with gradient, or None for no term."""
        raise NotImplementedError


#: name -> CleanTerm subclass. ``PurifyConfig.clean_term`` must be one of these keys.
CLEAN_TERMS: dict[str, type[CleanTerm]] = {}


#: Class decorator: ``@register_clean_term(name)`` adds a CleanTerm subclass to CLEAN_TERMS.
register_clean_term: Callable[[str], Callable[[type[CleanTerm]], type[CleanTerm]]] = registrar(
    CLEAN_TERMS, CleanTerm, "a clean term"
)


def make_clean_term(config: Any) -> CleanTerm:
    """Instantiate the term ``config.clean_term`` names (ValueError listing the registered names)."""
    return instantiate(CLEAN_TERMS, "clean_term", config)  # type: ignore[return-value]


@register_clean_term("none")
class NoCleanTerm(CleanTerm):
    """No clean-behaviour term: plain CBD pulling (the paper's loss alone)."""

    def __call__(self, inp: CleanTermInputs) -> torch.Tensor | None:
        return None


@register_clean_term("feature_consistency")
class FeatureConsistency(CleanTerm):
    """Relative squared distance of f_theta(x) to the frozen original encoder's f_0(x) on clean x.

    ``L = sum_i ||z_i - z0_i||^2 / sum_i ||z0_i||^2`` over the (global) batch: scale-free, and unlike
    a cosine it also keeps feature norms, which an original linear head reads.
    """

    needs_reference = True

    def __call__(self, inp: CleanTermInputs) -> torch.Tensor:
        assert inp.reference_features is not None
        z0 = inp.gather_no_grad(inp.reference_features(inp.x))
        z = inp.gather(inp.z_clean)
        # 1. squared distance to the original features, 2. normalised by their squared norm.
        return (z - z0).pow(2).sum() / z0.pow(2).sum().clamp_min(1e-12)


@register_clean_term("contrastive_views")
class ContrastiveViews(CleanTerm):
    """SimCLR-style NT-Xent between two augmented clean views (random crop with padding + flip)."""

    def views(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        cfg = self.config
        kind = cfg.augmentation if cfg.augmentation != "none" else "crop_flip"
        u1 = per_sample_uniform(indices, (3,), seed=cfg.seed, epoch=epoch, stream=2)
        u2 = per_sample_uniform(indices, (3,), seed=cfg.seed, epoch=epoch, stream=3)
        return torch.cat([augment(x, kind, cfg.crop_padding, u1), augment(x, kind, cfg.crop_padding, u2)])

    def __call__(self, inp: CleanTermInputs) -> torch.Tensor:
        from cbd_fast.ops import nt_xent

        assert inp.z_views is not None
        z1, z2 = inp.z_views.chunk(2)
        return nt_xent(inp.gather(z1), inp.gather(z2), inp.config.temperature, backend=inp.config.backend)


def augment(x: torch.Tensor, kind: str, padding: int, u: torch.Tensor) -> torch.Tensor:
    """Per-image random crop (zero padding) and/or horizontal flip, as batched tensor ops.

    Args:
        x: [B, C, H, W] float images on any device (not modified).
        kind: ``"none"``, ``"crop"``, ``"flip"`` or ``"crop_flip"``.
        padding: crop padding in pixels (>= 0); the crop keeps the size H x W.
        u: [B, 3] float uniform [0, 1) numbers on x's device, the only randomness: (row offset, column
            offset, flip coin) per image, e.g. ``per_sample_uniform(indices, (3,), seed=..., epoch=...)``.

    Returns:
        a new [B, C, H, W] tensor (``x`` itself when ``kind == "none"``).
    """
    if kind == "none":
        return x
    if kind not in ("crop", "flip", "crop_flip"):
        raise ValueError(f"augmentation must be one of 'none', 'crop', 'flip', 'crop_flip'; got {kind!r}")
    b, _, h, w = x.shape
    if u.shape != (b, 3):
        raise ValueError(f"u must have shape ({b}, 3); got {tuple(u.shape)}")
    dev = x.device
    out = x
    if kind in ("crop", "crop_flip") and padding > 0:
        # 1. pad, 2. gather an H x W window at a per-image offset in [0, 2 * padding].
        span = 2 * padding + 1
        oy = (u[:, 0] * span).long().clamp_(max=span - 1)
        ox = (u[:, 1] * span).long().clamp_(max=span - 1)
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]  # [B,1,H,1]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]  # [B,1,1,W]
        bidx = torch.arange(b, device=dev)[:, None, None, None]
        out = padded.permute(0, 2, 3, 1)[bidx, rows, cols].squeeze(1).permute(0, 3, 1, 2)
    if kind in ("flip", "crop_flip"):
        # 3. flip the images whose coin says so.
        flip = u[:, 2] < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# --- the default clean term (why: docs/method.md) ---


@register_clean_term("anchor")
class OriginalAnchor(CleanTerm):
    """Pull both views to the FROZEN original encoder's clean features, in squared distance.

    ``L = (mean_i ||z_i - z0_i||^2 + pull_ratio * mean_{i attacked} ||z_adv_i - z0_i||^2) /
    mean_i ||z0_i||^2`` over the (global) batch, with ``z0 = f_0(x)`` (with every image attacked:
    the three sums over the batch). Clean features stay where the original head reads them (norms
    included: the head is not scale-invariant, NT-Xent is), and adversarial features, the stand-ins
    for triggered ones, are pulled to the ORIGINAL clean features rather than to the drifting f_theta(x).
    ``pull_ratio`` (class attribute, 0.3) weighs the adversarial half against the clean half.
    """

    needs_reference = True
    pull_ratio: ClassVar[float] = 0.3  # chosen over 0.2 and 0.5 (docs/method.md)

    def __call__(self, inp: CleanTermInputs) -> torch.Tensor:
        assert inp.reference_features is not None
        # Global batch (identity in one process): every rank holds the same loss, so DDP's averaged
        # gradient equals the one-process gradient (a per-rank sum / per-rank norm would not).
        z0_local = inp.reference_features(inp.x)
        z0 = inp.gather_no_grad(z0_local)
        z = inp.gather(inp.z_clean)
        z_adv, z0_adv = inp.adversarial_pairs(z0_local)
        ratio = float(self.pull_ratio)
        # Per-image means, so the balance does not depend on how many images were attacked:
        # 1. clean consistency, 2. adversarial pull to the original clean features, over the mean
        # squared norm of the original features.
        n, m = z0.shape[0], max(z_adv.shape[0], 1)
        den = z0.pow(2).sum().clamp_min(1e-12) / n
        return ((z - z0).pow(2).sum() / n + ratio * (z_adv - z0_adv).pow(2).sum() / m) / den
