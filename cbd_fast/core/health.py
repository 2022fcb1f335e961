"""A label-free health check of the encoder being purified: has it kept the shape of its clean
feature space, or collapsed, or moved its clean features away from where a head reads them?

Measured on a held-out slice of the unlabeled images (never trained on), once before the first
epoch (the original encoder, the reference) and after every epoch, in eval mode without gradient.
All figures compare the current features ``Z`` [M, D] with the original's ``Z0`` [M, D'] on the
same images, so they need no labels and no head, and none depends on the features' scale:

- ``health_knn``: k-nearest-neighbour agreement. For each image, the share of its ``k`` nearest
  neighbours (cosine similarity, itself excluded) in ``Z0`` that are still among its ``k`` nearest
  in ``Z``; averaged over images. 1 = the same neighbourhoods; a random feature map gives about
  ``k / (M - 1)``.
- ``health_cka``: linear centred kernel alignment of ``Z`` and ``Z0`` (Kornblith et al., 2019):
  ``||Zc^T Z0c||_F^2 / (||Zc^T Zc||_F ||Z0c^T Z0c||_F)`` with column-centred ``Zc``, ``Z0c``; in
  [0, 1], 1 for features equal up to rotation and scale.
- ``health_rank``: the effective rank (exp of the entropy of the normalised singular values of
  ``Zc``; Roy & Vetterli, 2007) divided by that of ``Z0c``. A collapse into one cluster drives it
  towards 0.
- ``health_spread``: how spread out the images are relative to where they sit,
  ``tr Cov(Z) / mean ||z||^2``, divided by the same figure of ``Z0``. Features that all move
  towards one point (or far along one common direction) while keeping their relative layout keep
  ``health_knn`` and ``health_cka`` but send every image to the same class of a linear head: this
  figure falls towards 0 then.
- ``health_drift``: how far the clean features moved from where the original put them,
  ``mean ||z - z0||^2 / mean ||z0||^2`` (0 = unchanged; NaN when ``D != D'``). The figures above are
  blind to a rotation or a uniform shift of the whole cloud, which a head trained on the original
  features reads as a loss of accuracy: this one is not.
- ``health_flip``: the share of images whose pseudo class changed. The pseudo classes are
  ``FLIP_CLUSTERS`` k-means clusters of ``Z0``, and an image's class is its nearest centroid: a
  linear head built without labels (the nearest-mean rule, whose boundaries are hyperplanes). The
  drift says how far the features moved; this says how many crossed a boundary of the original
  feature space, so an encoder whose images sit close to its boundaries (a fragile model) shows a
  larger figure for the same drift. 0 = no image changed class (NaN when ``D != D'``, 1 when ``Z``
  is not finite).
- ``health_head_change`` (only when the head that reads the features is known,
  ``cbd_fast.core.heads``): the share of images whose predicted class (the argmax of the head's
  logits) changed. What ``health_flip`` estimates, measured: when it is there, its limit is acted
  on instead of the pseudo classes'.
- ``health_finite``: 1 when every feature is finite, else 0.

An epoch is unhealthy when any feature is non-finite, ``health_knn < min_knn``,
``health_rank < min_rank`` or ``health_spread < min_spread``; the encoder a run would return (after
its last epoch) also when ``health_drift > max_drift`` or (with at least ``MIN_FLIP_IMAGES``
held-out images) ``health_head_change > max_head_change`` with a head, ``health_flip > max_flip``
without one. Drift and
flips are judged on that encoder only: the clean features may move while the adversarial pull is
strongest and come back under the clean term, so an earlier epoch's figures are recorded, never
acted on. The thresholds are documented in
``docs/method.md`` with the runs they were set on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cbd_fast.core.backbones import with_standardisation
from cbd_fast.core.heads import FeatureHead, HeadSpec, resolve_head
from cbd_fast.core.modes import eval_mode

if TYPE_CHECKING:  # pragma: no cover
    from cbd_fast.core.prepare import Run

__all__ = [
    "HealthCheck",
    "HealthError",
    "health_figures",
    "make_health_check",
    "check_health",
    "DEFAULT_MIN_KNN",
    "DEFAULT_MIN_RANK",
    "DEFAULT_MIN_SPREAD",
    "DEFAULT_MAX_DRIFT",
    "DEFAULT_MAX_FLIP",
    "DEFAULT_MAX_HEAD_CHANGE",
    "FLIP_CLUSTERS",
    "MIN_FLIP_IMAGES",
    "K",
    "MIN_ENFORCED_IMAGES",
]

#: neighbours compared per image
K = 10
#: fewer images than this give figures too noisy to act on: they are recorded, never enforced
MIN_ENFORCED_IMAGES = 32
#: below this k-NN agreement the encoder no longer keeps its clean neighbourhoods
DEFAULT_MIN_KNN = 0.2
#: below this share of the original effective rank the features have collapsed
DEFAULT_MIN_RANK = 0.25
#: below this share of the original relative spread the features have collapsed towards one point
DEFAULT_MIN_SPREAD = 0.25
#: above this relative squared drift of the clean features, a head trained on the original features
#: misreads them (chosen on the dev attacks: ``docs/method.md``, 4.12)
DEFAULT_MAX_DRIFT = 0.1
#: above this share of held-out images that changed pseudo class, a head trained on the original
#: features changes its prediction on too many of them (chosen on the dev attacks: ``docs/method.md``, 4.12)
DEFAULT_MAX_FLIP = 0.12
#: above this share of held-out images whose prediction the known head changed, too many clean
#: predictions changed (the same rule as ``DEFAULT_MAX_FLIP``, on the dev runs' own heads:
#: ``docs/method.md``, 4.12)
DEFAULT_MAX_HEAD_CHANGE = 0.12
#: k-means clusters of the original features that stand in for a head's classes (``health_flip``)
FLIP_CLUSTERS = 10
#: fewer held-out images than this leave ~a dozen per cluster or fewer, and one image is >= 0.8% of
#: the figure: ``health_flip`` is then recorded, never acted on
MIN_FLIP_IMAGES = 128


class HealthError(RuntimeError):
    """The purified encoder failed the health check (collapsed or non-finite features)."""


def _knn(z: torch.Tensor, k: int) -> torch.Tensor:
    """[M, k] indices of each row's k most cosine-similar other rows of ``z`` [M, D]."""
    u = torch.nn.functional.normalize(z, dim=1)
    sim = u @ u.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def _effective_rank(zc: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of the centred features ``zc`` [M, D]."""
    s = torch.linalg.svdvals(zc)
    total = s.sum()
    if not bool(total > 0):
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _spread(z: torch.Tensor, zc: torch.Tensor) -> float:
    """``tr Cov(z) / mean ||z||^2`` of [M, D] features (0 for all-zero features)."""
    den = z.pow(2).sum(1).mean()
    return float(zc.pow(2).sum(1).mean() / den) if bool(den > 0) else 0.0


def pseudo_classes(
    z0: torch.Tensor, k: int = FLIP_CLUSTERS, *, iters: int = 50, restarts: int = 4
) -> torch.Tensor:
    """[k', D] float64 centroids of k-means on the original features ``z0`` [M, D] (k' = min(k, M)).

    Deterministic (k-means++ starts from a fixed seed, on the CPU in float64, the best of
    ``restarts`` by within-cluster squared distance), so every rank and a resumed run get the same
    centroids from the same features. A cluster left empty keeps its previous centroid.
    """
    z = z0.detach().to("cpu", torch.float64)
    k = max(1, min(k, len(z)))
    gen = torch.Generator().manual_seed(0)
    best, best_cost = z[:k].clone(), math.inf
    for _ in range(restarts):
        c = z[torch.randint(len(z), (1,), generator=gen)]
        while len(c) < k:  # k-means++: the next start with probability ~ squared distance
            d = torch.cdist(z, c).pow(2).min(1).values
            pick = (
                torch.multinomial(d / d.sum(), 1, generator=gen)
                if bool(d.sum() > 0)
                else torch.tensor([len(c)])
            )
            c = torch.cat([c, z[pick]])
        for _ in range(iters):
            a = torch.cdist(z, c).argmin(1)
            new = torch.stack([z[a == j].mean(0) if bool((a == j).any()) else c[j] for j in range(k)])
            if torch.equal(new, c):
                break
            c = new
        cost = float(torch.cdist(z, c).pow(2).min(1).values.sum())
        if cost < best_cost:
            best, best_cost = c, cost
    return best


def health_figures(
    z: torch.Tensor, z0: torch.Tensor, *, k: int = K, centroids: torch.Tensor | None = None
) -> dict[str, float]:
    """Compare current features ``z`` [M, D] with the original's ``z0`` [M, D'] (same images, M >= 3).

    Args:
        centroids: [k, D'] pseudo classes of ``z0`` (:func:`pseudo_classes`; computed here when
            None): pass them to measure every epoch against the same ones.

    Returns:
        ``health_knn``, ``health_cka``, ``health_rank``, ``health_spread`` (floats; 0 when ``z`` is
        not finite), ``health_drift`` (float; inf when ``z`` is not finite, NaN when ``D != D'``),
        ``health_flip`` (float in [0, 1]; 1 when ``z`` is not finite, NaN when ``D != D'``) and
        ``health_finite`` (1.0 or 0.0).
    """
    if z.dim() != 2 or z0.dim() != 2 or z.shape[0] != z0.shape[0] or z.shape[0] < 3:
        raise ValueError(
            "features must be [M, D] and [M, D'] with the same M >= 3; "
            f"got {tuple(z.shape)} and {tuple(z0.shape)}"
        )
    z, z0 = z.double(), z0.double()
    if not bool(torch.isfinite(z).all()):
        return {
            "health_knn": 0.0,
            "health_cka": 0.0,
            "health_rank": 0.0,
            "health_spread": 0.0,
            "health_drift": math.inf,
            "health_flip": 1.0,
            "health_finite": 0.0,
        }
    m = z.shape[0]
    k = max(1, min(k, m - 1))
    # 1. k-NN agreement: |N_k(z, i) ∩ N_k(z0, i)| / k, averaged over i.
    a, b = _knn(z, k), _knn(z0, k)
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).double().sum(1) / k
    # 2. linear CKA of the column-centred features.
    zc, z0c = z - z.mean(0), z0 - z0.mean(0)
    cross = (zc.T @ z0c).pow(2).sum()
    den = (zc.T @ zc).pow(2).sum().sqrt() * (z0c.T @ z0c).pow(2).sum().sqrt()
    cka = float(cross / den) if bool(den > 0) else 0.0
    # 3. effective rank relative to the original's.
    r0 = _effective_rank(z0c)
    rank = _effective_rank(zc) / r0 if r0 > 0 else 0.0
    # 4. relative spread tr Cov / mean squared norm, against the original's.
    s0 = _spread(z0, z0c)
    spread = _spread(z, zc) / s0 if s0 > 0 else 0.0
    # 5. drift: squared distance to the original features (where a fixed head reads them), relative
    #    to their squared norm; only defined when both live in the same space.
    drift = flip = math.nan
    if z.shape[1] == z0.shape[1]:
        n0 = z0.pow(2).sum(1).mean()
        drift = float((z - z0).pow(2).sum(1).mean() / n0) if bool(n0 > 0) else math.inf
        # 6. pseudo-class changes: nearest centroid (of k-means on z0) before and after.
        c = (pseudo_classes(z0) if centroids is None else centroids).to(z.device, torch.float64)
        flip = float((torch.cdist(z, c).argmin(1) != torch.cdist(z0, c).argmin(1)).double().mean())
    return {
        "health_knn": float(hits.mean()),
        "health_cka": cka if math.isfinite(cka) else 0.0,
        "health_rank": rank,
        "health_spread": spread,
        "health_drift": drift,
        "health_flip": flip,
        "health_finite": 1.0,
    }


@dataclass
class HealthCheck:
    """The per-epoch check of a run.

    Attributes:
        images: [M, C, H, W] the held-out unlabeled images on the run's device.
        reference: [M, D'] float32 features of the original encoder on them.
        min_knn, min_rank, min_spread, max_drift, max_flip, max_head_change: the thresholds (see
            the module docstring).
        centroids: [k, D'] float64 pseudo classes of ``reference`` (computed when not given).
        head: the head that reads the features (:class:`cbd_fast.core.heads.FeatureHead`), or None.
        reference_pred: [M] int64 the head's predictions on ``reference`` (computed when not given).
    """

    images: torch.Tensor
    reference: torch.Tensor
    min_knn: float = DEFAULT_MIN_KNN
    min_rank: float = DEFAULT_MIN_RANK
    min_spread: float = DEFAULT_MIN_SPREAD
    max_drift: float = DEFAULT_MAX_DRIFT
    max_flip: float = DEFAULT_MAX_FLIP
    centroids: torch.Tensor | None = None
    head: FeatureHead | None = None
    max_head_change: float = DEFAULT_MAX_HEAD_CHANGE
    reference_pred: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.centroids is None:
            self.centroids = pseudo_classes(self.reference)
        if self.head is not None and self.reference_pred is None:
            self.reference_pred = self.head.predict(self.reference)

    def figures(self, z: torch.Tensor) -> dict[str, float]:
        """:func:`health_figures` of the current features ``z`` [M, D] against the reference, and
        ``health_head_change`` with a head (1 when ``z`` is not finite or not the head's width)."""
        out = health_figures(z, self.reference, centroids=self.centroids)
        if self.head is not None and self.reference_pred is not None:
            change = 1.0
            if out["health_finite"] == 1.0 and z.shape[1] == self.reference.shape[1]:
                pred = self.head.predict(z).to(self.reference_pred.device)
                change = float((pred != self.reference_pred).double().mean())
            out["health_head_change"] = change
        return out

    def problems(self, figures: dict[str, float], *, final: bool = True) -> list[str]:
        """Why ``figures`` are unhealthy (empty when healthy); the drift limit applies only to the
        ``final`` encoder, the one the run returns."""
        out = []
        if figures["health_finite"] < 1:
            out.append("the features are not finite (NaN/Inf)")
        if figures["health_knn"] < self.min_knn:
            out.append(
                f"k-NN agreement with the original features {figures['health_knn']:.3f} < {self.min_knn:g}"
            )
        if figures["health_spread"] < self.min_spread:
            out.append(
                f"relative spread {figures['health_spread']:.3f} < {self.min_spread:g} "
                "(the features moved together towards one point)"
            )
        if figures["health_rank"] < self.min_rank:
            out.append(f"effective rank ratio {figures['health_rank']:.3f} < {self.min_rank:g} (a collapse)")
        if final and figures.get("health_drift", 0.0) > self.max_drift:  # NaN (other D) never fails
            out.append(
                f"feature drift {figures['health_drift']:.3f} > {self.max_drift:g} (the clean features moved "
                "away from where a head trained on the original encoder reads them: expect lost accuracy)"
            )
        enough = len(self.images) >= MIN_FLIP_IMAGES  # fewer: too noisy to act on
        change = figures.get("health_head_change")
        if final and enough and change is not None and change > self.max_head_change:
            out.append(
                f"changed predictions {change:.3f} > {self.max_head_change:g} (the model's head predicts "
                "another class than before on that share of the clean images: expect lost accuracy)"
            )
        if final and enough and change is None and figures.get("health_flip", 0.0) > self.max_flip:
            out.append(
                f"pseudo-class changes {figures['health_flip']:.3f} > {self.max_flip:g} (that share of the "
                "clean images crossed a boundary between clusters of the original features: a head trained "
                "on the original encoder would change its prediction on about as many)"
            )
        return out


def _float_images(images: torch.Tensor, run: Run) -> torch.Tensor:
    """``images`` as the run's float dtype in [0, 1] on its device (uint8 scaled by 1/255)."""
    x = images.to(run.ctx.device)
    x = x.to(run.dtype).div_(255.0) if x.dtype == torch.uint8 else x.to(run.dtype)
    if run.ctx.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _eval_features(run: Run, module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """[M, D] float32 features of ``x`` in eval mode, without gradient, 256 images at a time."""
    with eval_mode(module), run.ctx.autocast(), torch.no_grad():
        return torch.cat([module(x[i : i + 256]).float() for i in range(0, len(x), 256)])


def make_health_check(run: Run, images: torch.Tensor, head: HeadSpec = None) -> HealthCheck:
    """The run's check on ``images`` [M, C, H, W] (uint8 or float), with the ORIGINAL encoder's
    features as the reference and ``head`` resolved on the original (``cbd_fast.core.heads``): call
    it before the first update (and before restoring a checkpoint)."""
    cfg = run.config
    x = _float_images(images, run)
    original = run.reference if run.reference is not None else run.features
    feature_head = resolve_head(
        head,
        run.model,
        run.features.feature_fn,
        with_standardisation(None, cfg.input_mean, cfg.input_std),
        x,
        run.ctx.autocast,
        reduced_precision=run.ctx.amp_dtype is not None or run.dtype != torch.float32,
    )
    return HealthCheck(
        images=x,
        reference=_eval_features(run, original, x),
        min_knn=cfg.health_min_knn,
        min_rank=cfg.health_min_rank,
        min_spread=cfg.health_min_spread,
        max_drift=cfg.health_max_drift,
        max_flip=cfg.health_max_flip,
        head=feature_head,
        max_head_change=cfg.health_max_head_change,
    )


def check_health(
    run: Run, check: HealthCheck, epoch: int, last_ckpt: Path | None, *, held: bool
) -> dict[str, float]:
    """Measure the encoder after epoch ``epoch`` (0-based) and apply ``config.health``.

    Returns:
        the figures, for the epoch's history entry.

    Raises:
        HealthError: unhealthy under ``health="stop"``: names the figures, the thresholds and the
            last good checkpoint.
    """
    figures = check.figures(_eval_features(run, run.features, check.images))
    problems = check.problems(figures, final=epoch + 1 >= run.config.epochs)
    if not problems or len(check.images) < MIN_ENFORCED_IMAGES:
        return figures
    where = "held-out" if held else "first-batch"
    text = (
        f"after epoch {epoch + 1}/{run.config.epochs} the encoder failed the label-free health check on "
        f"{len(check.images)} {where} unlabeled images: {'; '.join(problems)} "
        f"(CKA {figures['health_cka']:.3f})"
    )
    if run.config.health == "warn":
        warnings.warn(text + "; continuing (health='warn')", RuntimeWarning, stacklevel=3)
        return figures
    # drift and flips alone: the features moved but kept their shape (earlier epochs were not judged)
    drift_only = all(p.startswith(("feature drift", "pseudo-class", "changed predictions")) for p in problems)
    if not last_ckpt:
        kept = "no checkpoint was written (set checkpoint_dir to keep the healthy epochs)"
    elif drift_only:  # earlier epochs passed the collapse limits; their drift is only recorded
        kept = f"the previous epoch's checkpoint {last_ckpt} is intact; its drift is in the history"
    else:
        kept = f"the last good checkpoint {last_ckpt} is intact"
    if not drift_only:
        advice = "Lower lr or clean_weight"
    elif check.head is None:
        advice = (
            "Lower lr or raise clean_weight. If the model's head is at hand, pass it (purify(..., "
            "head=...)): the check then counts the predictions it really changed instead of "
            "estimating them. If a new head will be trained on the purified encoder (the drift does "
            "not matter then), raise health_max_drift and health_max_flip"
        )
    else:
        advice = (
            "Lower lr or raise clean_weight; if a new head will be trained on the purified encoder "
            "(the drift does not matter then), pass head=False and raise health_max_drift and "
            "health_max_flip, or raise health_max_head_change"
        )
    raise HealthError(
        f"{text}. Purification stopped and the broken encoder is not returned ({kept}). {advice}, or set "
        "health='warn' to continue anyway"
    )
