"""A label-free trigger search in feature space (``adversary="trigger_search"``).

Backdoor triggers are shortcuts of a few kinds: additive per-pixel changes, pasted local patterns,
smooth geometric warps, global tone/colour changes, universal additive signals (smooth or not).
The search keeps one parameterised family for each, none shaped after a particular trigger:

- ``pgd``: ``x + delta_i`` per sample, ``|delta|_inf <= epsilon``;
- ``mask``: ``x + m * (p - x)`` with one mask m [H, W] and pattern p [C, H, W] for all images,
  ``0 <= m <= 1`` and ``sum m <= mask_area * H * W``;
- ``warp``: resampling at ``identity + sum_s up(flow_s)`` over control grids 2, 4 and 8, the
  displacement at most ``warp_bound * min(H, W)`` pixels;
- ``tone``: ``x + o_c(x)``, a piecewise-linear curve per channel, ``|o| <= tone_bound``;
- ``additive``: ``x + up(coarse) + fine``, a smooth [C, g, g] field upsampled bicubically plus a
  full-resolution [C, H, W] one (universal), ``|.|_inf <= additive_epsilon``;
- ``sparse``: ``x + delta_i`` per sample with at most ``sparse_area * H * W`` pixels changed, each
  by any amount within [0, 1] (an L0 ball: what a pasted patch, scattered pixels or a per-image mask
  have in common, wherever they are; ``transforms.sparse_step``).

The bounds are fractions of the image or of the pixel range; nothing fixes a trigger's position,
size, pattern or grid. Each universal family keeps ``restarts`` persistent parameter sets (the mask
family ``mask_restarts``, by default as many), used in turn (one per batch), refined on every batch
and saved in checkpoints. The mask family starts from a label-free scan: squares of ``scan_areas``
sizes (a geometric ladder of areas from a quarter of ``mask_area`` to ``mask_area``; by default
three: sides 3, 4 and 6 on 28 x 28) are pasted at every position (stride half a side) on a few
images, filled black, white, with a random binary pattern and with a pattern of their own raised
by ``scan_ascent`` gradient steps (so that an optimised trigger pattern is found as well as a
hand-made one), and the ``mask_restarts`` positions that move the features most become the
initial masks; the gradient then reshapes the mask within its area budget and within its square
grown by ``mask_window`` sides. With ``rescan_every`` k > 0 the scan runs again on the encoder being
fine-tuned at the first batch of every k-th epoch, and its squares replace the masks.

One attack per batch: every image is assigned one family; all of them are attacked TOGETHER,
``batch_steps`` (2) times: one forward of the whole adversarial batch, ``L = NTXent(f(x'), clean
anchors)``, one backward giving the per-sample gradients and every universal parameter's gradient;
signed gradient ascent then projection on each family's set. The sparse rows then take the rest of
``steps`` (7) alone: a forward of those rows only, the other rows' features held at those of the last
shared forward in the same NT-Xent batch. The universal families persist and are refined on every batch,
and an L-inf PGD row reaches its ball in a few steps; the L0 search picks its pixels step by step
and is the one that needs the steps (``docs/method.md`` 4.20). Cost: ``2 * batch_steps + 2 * s *
(steps - batch_steps)`` passes of the batch for a sparse share s, against ``2 * steps`` for
per-sample PGD. With ``head_attack`` w > 0 and a known head h, ``L`` also holds
``w * sum_i KL(h(anchor_i) || h(f(x'_i))) / B`` (the head's predictions moved away from its clean
ones, as TRADES's inner maximisation; off by default: ``docs/method.md`` 4.28).

Budget by measurement: a family's share of the batch is ``min_share`` plus the rest split in
proportion to ``weight_f * strength_f``, where ``strength_f`` is an exponential moving average
(``share_momentum``) of the family's mean feature shift ``1 - cos(f(x'), f(x))`` on its images at
the last attack step. A family that moves the features more gets more of the batch; each keeps its
floor so a weakening family can recover. The families' weights (``*_weight``, 0 turns one off) are
priors, equal by default.

Distributed: the assignment of an image to a family is a pure function of (seed, epoch, sample
index, shares); the NT-Xent negatives are global (``inputs.gather``); universal gradients, the
scan's scores and the strength statistics are summed over ranks (``inputs.reduce``). Every rank
therefore holds the same universal parameters and shares, and a run on N ranks follows the
one-process run with the same global batch (up to the summation order of floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cbd_fast.core.adversaries.base import Adversary, AttackInputs, Option, register_adversary
from cbd_fast.core.adversaries.transforms import (
    additive,
    mask_blend,
    project_area,
    sparse_step,
    tone_map,
    upsample,
    warp_images,
)
from cbd_fast.core.modes import attack_mode
from cbd_fast.core.rng import per_sample_uniform, random_start
from cbd_fast.ops.nt_xent import nt_xent
from cbd_fast.ops.pgd import pgd_step

__all__ = ["TriggerSearch", "FAMILIES"]

#: the search's families, in the order of their shares
FAMILIES = ("pgd", "mask", "warp", "tone", "additive", "sparse")
#: families that need [B, C, H, W] images
_SPATIAL = frozenset({"mask", "warp", "tone", "additive", "sparse"})
#: families attacked per sample (the others are universal: one parameter set for all images)
_PER_SAMPLE = ("pgd", "sparse")
#: prior weights by default (``*_weight`` options)
#: (sparse 3: chosen on the dev attacks, docs/method.md 4.2.2; the others equal, not ablated)
_DEFAULT_WEIGHTS = {"pgd": 1.0, "mask": 1.0, "warp": 1.0, "tone": 1.0, "additive": 1.0, "sparse": 3.0}
#: the warp's control grids (a dyadic pyramid: coarse to fine smooth fields)
_WARP_GRIDS = (2, 4, 8)
#: rng streams (``per_sample_uniform``) of the assignment and of the scan's image choice
_ASSIGN_STREAM, _SCAN_STREAM, _START_STREAM = 11, 12, 0


#: the mask scan's successive halving: buckets of the scan images, images per round, finalists
_SCAN_BUCKETS, _SCAN_ROUND_IMAGES, _SCAN_FINALISTS = 256, (4, 8, 16), 16


def _scan_rounds(counts: list[float], keep: float) -> list[int]:
    """Bucket ends (exclusive) of the scan's rounds: the smallest prefixes of the buckets that hold
    at least 4, 8, 16 images, then all of them; one round (every bucket) when ``keep`` is 1."""
    n = len(counts)
    if keep >= 1.0:
        return [n]
    ends, cum = [], 0.0
    targets = list(_SCAN_ROUND_IMAGES)
    for b, cnt in enumerate(counts):
        cum += cnt
        while targets and cum >= targets[0]:
            targets.pop(0)
            if not ends or ends[-1] != b + 1:
                ends.append(b + 1)
    if not ends or ends[-1] != n:
        ends.append(n)
    return ends


def _square_shifts(
    encoder: Any,
    xs: torch.Tensor,
    z0: torch.Tensor,
    squares: list[tuple[int, int, int, str, torch.Tensor]],
    batch_size: int,
) -> torch.Tensor:
    """sum over images of ``||f(x with the square pasted) - f(x)||^2``, one float64 per square.

    xs: [n, C, H, W] float32 images; z0: [n, D] float32 their features; forwards of at most
    ``batch_size`` images (the memory the run already needs).
    """
    out = torch.zeros(len(squares), dtype=torch.float64, device=xs.device)
    chunk = max(1, batch_size // xs.shape[0])
    for s0 in range(0, len(squares), chunk):
        part = squares[s0 : s0 + chunk]
        batch = xs.unsqueeze(0).repeat(len(part), 1, 1, 1, 1)
        for j, (k, r, q, _, pix) in enumerate(part):
            batch[j, :, :, r : r + k, q : q + k] = pix
        z = encoder(batch.flatten(0, 1)).flatten(1).float().view(len(part), xs.shape[0], -1)
        out[s0 : s0 + len(part)] = (z - z0).pow(2).sum(2).double().sum(1)
    return out


def _ascend_square_patterns(
    encoder: Any,
    xs: torch.Tensor,
    z0: torch.Tensor,
    positions: list[tuple[int, int]],
    side: int,
    steps: int,
    step: float,
    batch_size: int,
    reduce: Any,
) -> torch.Tensor:
    """A pattern per square, each raised by ``steps`` signed-gradient steps of its own pixels.

    For every (row, col) in ``positions`` a [C, side, side] pattern starts at 0.5 (mid-grey) and takes
    ``steps`` steps of ``step`` along the sign of the gradient of ``sum_i ||f(x_i with it pasted) -
    f(x_i)||^2`` over ``xs`` [n, C, H, W] (``z0`` [n, D] their features), clamped to [0, 1]: the fill
    that moves the features most near this square, whatever pattern a trigger there has (a fixed
    black, white or random fill finds only triggers that resemble it). ``reduce`` (None in one
    process) sums the gradients over ranks, so every rank holds the same patterns; a rank without
    images contributes zeros. Returns [P, C, side, side] float32.
    """
    c = xs.shape[1]
    pats = torch.full((len(positions), c, side, side), 0.5, device=xs.device)
    n = xs.shape[0]
    chunk = max(1, batch_size // max(1, n))
    for _ in range(steps):
        grad = torch.zeros_like(pats)
        if n > 0:
            for s0 in range(0, len(positions), chunk):
                part = positions[s0 : s0 + chunk]
                leaf = pats[s0 : s0 + len(part)].clone().requires_grad_(True)
                with torch.enable_grad():
                    batch = xs.unsqueeze(0).repeat(len(part), 1, 1, 1, 1)
                    for j, (r, q) in enumerate(part):
                        batch[j, :, :, r : r + side, q : q + side] = leaf[j]
                    z = encoder(batch.flatten(0, 1)).flatten(1).float().view(len(part), n, -1)
                    (g,) = torch.autograd.grad((z - z0).pow(2).sum(), [leaf])
                grad[s0 : s0 + len(part)] = g
        if reduce is not None:
            grad = reduce(grad)
        pats = (pats + step * grad.sign()).clamp(0.0, 1.0)
    return pats


def _scan_areas(area: float, n: int) -> list[float]:
    """``n`` areas on a geometric ladder from ``area / 4`` to ``area`` (1: ``area`` alone; 2: the
    quarter and the whole; 3 adds the half)."""
    if n == 1:
        return [area]
    return [area / 4 * 4 ** (i / (n - 1)) for i in range(n)]


@register_adversary("trigger_search")
class TriggerSearch(Adversary):
    """Per-sample PGD, a free-form mask + pattern, multi-scale warps, tone curves and universal
    additive signals, attacked together with batch shares set by how strongly each moves the features.

    See the module docstring for the families, their bounds and the share rule;
    ``docs/method.md`` for the measurements. Settings: ``OPTIONS``.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        **{
            f"{f}_weight": Option(
                _DEFAULT_WEIGHTS[f], float, 0.0, doc=f"prior weight of the {f} family (0: off)"
            )
            for f in FAMILIES
        },
        "min_share": Option(0.08, float, 0.0, 0.2, doc="floor of each active family's share of a batch"),
        "share_momentum": Option(0.9, float, 0.0, 0.999, doc="EMA momentum of the measured strengths"),
        "restarts": Option(2, int, 1, 16, doc="persistent parameter sets per universal family, in turn"),
        "mask_restarts": Option(
            None, int, 1, 16, doc="persistent masks (the scan's best squares), in turn; None: restarts"
        ),
        "mask_area": Option(0.04, float, 1e-4, 1.0, doc="largest mask area, a fraction of the image"),
        "mask_step": Option(0.1, float, 0.0, 1.0, doc="signed-gradient step of the mask values"),
        "pattern_step": Option(0.25, float, 0.0, 1.0, doc="signed-gradient step of the pattern values"),
        "scan_images": Option(32, int, 2, doc="images (of the first global batch) the mask scan scores"),
        "scan_keep": Option(
            0.25, float, 0.01, 1.0, doc="share of the scan's squares each round keeps (1: all, every image)"
        ),
        "warp_bound": Option(0.06, float, 0.0, 0.5, doc="largest displacement, a fraction of min(H, W)"),
        "tone_bound": Option(0.25, float, 0.0, 1.0, doc="largest tone-curve offset"),
        "tone_knots": Option(8, int, 2, 256, doc="knots of the piecewise-linear tone curve"),
        "additive_grid": Option(8, int, 1, 64, doc="control grid side of the smooth additive field"),
        "additive_epsilon": Option(
            None, float, 0.0, 1.0, doc="L-inf bound of the additive perturbation; None: config.epsilon"
        ),
        "sparse_area": Option(
            0.08, float, 1e-4, 1.0, doc="largest share of pixels the sparse family changes"
        ),
        "sparse_step": Option(1.0, float, 1e-3, 1.0, doc="the sparse family's largest move per step"),
        "scan_ascent": Option(
            3,
            int,
            0,
            16,
            doc="signed-gradient steps of each scanned square's own pattern (0: fixed fills only)",
        ),
        "mask_window": Option(
            0.5,
            float,
            0.0,
            8.0,
            doc="keep each mask within its scan square grown by this many sides (0: anywhere)",
        ),
        "scan_areas": Option(
            3, int, 1, 8, doc="square areas the scan tries: a geometric ladder, mask_area / 4 to mask_area"
        ),
        "head_attack": Option(
            0.0,
            float,
            0.0,
            100.0,
            doc="weight of KL(h(f(x)) || h(f(x'))) added to the objective the search raises, when the "
            "run knows the model's head h (0: off; no effect without a head)",
        ),
        "rescan_every": Option(
            0,
            int,
            0,
            doc="run the mask scan again on the current encoder at the first batch of every k-th "
            "epoch, replacing the masks (0: only at the start)",
        ),
        "batch_steps": Option(
            2,
            int,
            0,
            doc="of config.steps, how many attack the whole batch; the rest forward only the sparse "
            "rows (0: all)",
        ),
    }

    @classmethod
    def check_combination(cls, options: dict[str, Any]) -> None:
        """At least one family on; the floors of the active families must leave room (sum <= 1)."""
        active = [f for f in FAMILIES if options[f"{f}_weight"] > 0]
        if not active:
            raise ValueError(
                f"adversary {cls.name!r}: every family weight is 0 "
                f"({', '.join(f'{f}_weight' for f in FAMILIES)}); turn at least one on"
            )
        if options["min_share"] * len(active) > 1.0 + 1e-9:
            raise ValueError(
                f"adversary_options min_share of adversary {cls.name!r} times the {len(active)} active "
                f"families must be <= 1; got {options['min_share']} * {len(active)}"
            )

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._strength: dict[str, float] = {}
        self._params: dict[str, list[list[torch.Tensor]]] | None = None
        self._calls = 0
        self._scanned_epoch = 0  # the epoch of the last mask scan
        self.scan_scores: list[tuple[float, int, int, int, str]] = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``params`` (family -> restarts -> list of CPU tensors; None before the first batch),
        ``strength`` (family -> float), ``calls``, ``scanned_epoch`` and ``scan_scores``."""
        params = None
        if self._params is not None:
            params = {
                f: [[t.detach().cpu().clone() for t in ps] for ps in sets] for f, sets in self._params.items()
            }
        return {
            "params": params,
            "strength": dict(self._strength),
            "calls": self._calls,
            "scanned_epoch": self._scanned_epoch,
            "scan_scores": [list(s) for s in self.scan_scores],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (tensors move to the images' device on use)."""
        params = state["params"]
        self._params = (
            None
            if params is None
            else {f: [[t.clone() for t in ps] for ps in sets] for f, sets in params.items()}
        )
        self._strength = {str(k): float(v) for k, v in state["strength"].items()}
        self._calls = int(state["calls"])
        self._scanned_epoch = int(state.get("scanned_epoch", 0))  # absent in older checkpoints
        self.scan_scores = [
            (float(a), int(b), int(c), int(d), str(e)) for a, b, c, d, e in state["scan_scores"]
        ]

    # ------------------------------------------------------------------ shares
    def active_families(self, x: torch.Tensor) -> list[str]:
        """The families with a weight > 0 that apply to ``x`` (spatial ones need [B, C, H, W])."""
        spatial = x.dim() == 4
        return [f for f in FAMILIES if self.options[f"{f}_weight"] > 0 and (spatial or f not in _SPATIAL)]

    def shares(self, families: list[str]) -> dict[str, float]:
        """Each family's share of a batch: ``min_share`` + the rest in proportion to weight x
        strength (strength 1 before it is measured), rounded to 1/1024 so that ranks agree."""
        floor = self.options["min_share"]
        raw = {f: self.options[f"{f}_weight"] * self._strength.get(f, 1.0) for f in families}
        total = sum(raw.values())
        free = 1.0 - floor * len(families)
        out = {}
        for f in families:
            share = floor + free * (raw[f] / total if total > 0 else 1.0 / len(families))
            out[f] = round(share * 1024) / 1024
        return out

    def _assign(self, inp: AttackInputs, families: list[str]) -> torch.Tensor:
        """[B] int64 family position (into ``families``) per image, from its own uniform number."""
        u = per_sample_uniform(
            inp.indices, (), seed=int(self.config.seed), epoch=inp.epoch, stream=_ASSIGN_STREAM
        )
        sh = self.shares(families)
        edges = torch.tensor([sh[f] for f in families], dtype=torch.float64).cumsum(0)
        edges = (edges / edges[-1]).to(torch.float32).to(u.device)
        return torch.searchsorted(edges[:-1].contiguous(), u.contiguous(), right=True)

    # ------------------------------------------------------------------ initial parameters
    def _init_params(self, inp: AttackInputs, families: list[str]) -> None:
        x = inp.x
        g = torch.Generator().manual_seed(int(self.config.seed) + 104729)
        r = self.options["restarts"]
        params: dict[str, list[list[torch.Tensor]]] = {}
        if x.dim() == 4:
            _, c, h, w = x.shape
            side = min(h, w)
            wb = self.options["warp_bound"] * side
            te = self.options["tone_bound"]
            le = self._additive_eps()
            lg = self.options["additive_grid"]
            k = self.options["tone_knots"]

            def uni(shape: tuple[int, ...], bound: float) -> torch.Tensor:
                return ((torch.rand(shape, generator=g) * 2 - 1) * bound).to(x.device)

            params["warp"] = [[uni((1, 2, s, s), wb) for s in _WARP_GRIDS] for _ in range(r)]
            params["tone"] = [[uni((c, k), te / 2)] for _ in range(r)]
            params["additive"] = [
                [uni((1, c, min(lg, h), min(lg, w)), le / 2), uni((1, c, h, w), le / 2)] for _ in range(r)
            ]
            if "mask" in families:
                params["mask"] = self._scan(inp)
        self._params = params

    def _rescan_due(self, epoch: int, families: list[str]) -> bool:
        """Whether this batch scans again (``rescan_every`` k > 0): the first batch of an epoch that is
        a multiple of k and later than the last scan's, with the mask family active (image inputs)."""
        k = self.options["rescan_every"]
        return k > 0 and "mask" in families and epoch > self._scanned_epoch and epoch % k == 0

    def _mask_restarts(self) -> int:
        v = self.options["mask_restarts"]
        return int(self.options["restarts"] if v is None else v)

    def _additive_eps(self) -> float:
        v = self.options["additive_epsilon"]
        return float(self.config.epsilon if v is None else v)

    @torch.no_grad()
    def _scan(self, inp: AttackInputs) -> list[list[torch.Tensor]]:
        """Initial masks: the squares (``scan_areas`` areas; black / white / random / own fills) that move the
        features most. Own fills (``scan_ascent`` > 0): a pattern per square raised by
        :func:`_ascend_square_patterns` on the images of the first halving round.

        Images scored: those of the (global) batch whose own uniform number ``u`` falls below
        ``share = scan_images / B_global`` (a choice that does not depend on ranks). Score of a square:
        the mean relative squared feature shift ``||f(x') - f(x)||^2 / mean ||f(x)||^2`` over them,
        summed over ranks. Returns ``mask_restarts`` [mask [1, 1, H, W], pattern [1, C, H, W]] pairs,
        each with a third tensor, the [1, 1, H, W] 0/1 window the mask must stay in, when ``mask_window``
        is > 0.

        Successive halving (Karnin et al. 2013; Jamieson and Talwalkar 2016) with ``scan_keep`` = q
        below 1: every square is first scored on about 4 of the images, only the best fraction q
        goes on to be scored on the next images (about 8 in all, then 16, then all of them), at
        least ``max(_SCAN_FINALISTS, 8 * mask_restarts)`` squares each round. Scores accumulate, so the
        finalists are ranked on every scan image exactly as the full scan (q = 1) ranks them: the
        two choose the same squares unless the full scan's choice is among the pruned. Rounds are
        fixed by ``u`` in 256 buckets of [0, share) with globally summed counts, so every rank
        prunes the same squares.
        """
        x, opt = inp.x, self.options
        _, c, h, w = x.shape
        b_global = inp.clean_features.shape[0]
        share = min(1.0, opt["scan_images"] / b_global)
        u = per_sample_uniform(inp.indices, (), seed=int(self.config.seed), epoch=0, stream=_SCAN_STREAM)
        picked = u < share
        xs, us = x[picked].float(), u[picked]
        area = opt["mask_area"] * h * w
        sides = sorted({max(1, min(h, w, round(math.sqrt(a)))) for a in _scan_areas(area, opt["scan_areas"])})
        g = torch.Generator().manual_seed(int(self.config.seed) + 15485863)
        squares: list[tuple[int, int, int, str, torch.Tensor]] = []  # (side, row, col, kind, pixels)
        grids: list[tuple[int, list[int], list[int]]] = []
        for k in sides:
            stride = max(1, k // 2, math.ceil((max(h, w) - k + 1) / 16))
            rows = sorted(set(range(0, h - k + 1, stride)) | {h - k})
            cols = sorted(set(range(0, w - k + 1, stride)) | {w - k})
            grids.append((k, rows, cols))
            rand = (torch.rand((1, c, k, k), generator=g) > 0.5).float().to(x.device)
            for kind, pix in (
                ("black", torch.zeros(1, c, k, k, device=x.device)),
                ("white", torch.ones(1, c, k, k, device=x.device)),
                ("random", rand),
            ):
                squares += [(k, r, q, kind, pix) for r in rows for q in cols]
        # Rounds: the bucket of an image is floor(256 u / share); round i scores the buckets < ends[i].
        bucket = (us * (_SCAN_BUCKETS / share)).long().clamp(0, _SCAN_BUCKETS - 1)
        counts = torch.bincount(bucket, minlength=_SCAN_BUCKETS).double()
        if inp.reduce is not None:
            counts = inp.reduce(counts)
        ends = _scan_rounds(counts.cpu().tolist(), float(opt["scan_keep"]))
        norm = torch.zeros(2, dtype=torch.float64, device=x.device)  # sum ||f(x)||^2, image count
        with attack_mode(inp.encoder):
            z0 = inp.encoder(xs).flatten(1).float() if xs.shape[0] > 0 else None
            if z0 is not None:
                norm[0] = z0.pow(2).sum(1).double().sum()
                norm[1] = xs.shape[0]
            if opt["scan_ascent"] > 0:  # one more fill per square: its own pattern, raised on ~4 images
                # the images of the halving schedule's first round, the same whatever scan_keep is
                first = bucket < _scan_rounds(counts.cpu().tolist(), 0.25)[0]
                x1 = xs[first]
                z1 = z0[first] if z0 is not None else torch.zeros(0, 1, device=x.device)
                for k, rows, cols in grids:
                    pos = [(r, q) for r in rows for q in cols]
                    pats = _ascend_square_patterns(
                        inp.encoder,
                        x1,
                        z1,
                        pos,
                        k,
                        opt["scan_ascent"],
                        opt["pattern_step"],
                        x.shape[0],
                        inp.reduce,
                    )
                    squares += [(k, r, q, "ascent", pats[j : j + 1]) for j, (r, q) in enumerate(pos)]
            # total: the shifts summed over ranks and over the rounds so far (the same on every rank)
            total = torch.zeros(len(squares), dtype=torch.float64, device=x.device)
            alive = list(range(len(squares)))
            lo = 0
            for i, hi in enumerate(ends):
                if i > 0:  # keep the best fraction of the survivors, ranked on the rounds so far
                    # room for non-overlapping picks
                    finalists = max(_SCAN_FINALISTS, 8 * self._mask_restarts())
                    n_keep = max(finalists, math.ceil(opt["scan_keep"] * len(alive)))
                    ranked = torch.argsort(total[alive].cpu(), descending=True, stable=True).tolist()
                    alive = sorted(alive[j] for j in ranked[:n_keep])
                in_round = (bucket >= lo) & (bucket < hi)
                part = torch.zeros(len(alive), dtype=torch.float64, device=x.device)
                if z0 is not None and bool(in_round.any()):
                    sq = [squares[j] for j in alive]
                    part = _square_shifts(inp.encoder, xs[in_round], z0[in_round], sq, x.shape[0])
                if inp.reduce is not None:
                    part = inp.reduce(part)
                total[alive] += part
                lo = hi
        if inp.reduce is not None:
            norm = inp.reduce(norm)
        score = torch.full((len(squares),), -math.inf, dtype=torch.float64, device=x.device)
        score[alive] = total[alive] / norm[0].clamp_min(1e-12)  # sum of shifts / sum of squared norms
        order = torch.argsort(score.cpu(), descending=True, stable=True).tolist()
        chosen: list[tuple[int, int, int, str, torch.Tensor]] = []
        for i in order:  # best squares that do not overlap an already chosen one
            k, r, q, kind, pix = squares[i]
            if all(r + k <= r2 or r2 + k2 <= r or q + k <= q2 or q2 + k2 <= q for k2, r2, q2, _, _ in chosen):
                chosen.append(squares[i])
            if len(chosen) == self._mask_restarts():
                break
        self.scan_scores = [
            (float(score[i]), squares[i][1], squares[i][2], squares[i][0], squares[i][3]) for i in order[:16]
        ]
        out = []
        for k, r, q, _, pix in chosen:
            m = torch.zeros(1, 1, h, w, device=x.device)
            m[..., r : r + k, q : q + k] = 1.0
            p = torch.full((1, c, h, w), 0.5, device=x.device)
            p[..., r : r + k, q : q + k] = pix
            pair = [project_area(m, area), p]
            if opt["mask_window"] > 0:
                e = math.ceil(opt["mask_window"] * k)
                support = torch.zeros(1, 1, h, w, device=x.device)
                support[..., max(0, r - e) : r + k + e, max(0, q - e) : q + k + e] = 1.0
                pair.append(support)
            out.append(pair)
        return out

    # ------------------------------------------------------------------ the transforms
    def _apply(self, family: str, x: torch.Tensor, ps: list[torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[-2:]
        if family == "mask":
            return mask_blend(x, ps[0], ps[1])
        if family == "warp":
            bound = self.options["warp_bound"] * min(h, w)
            disp = sum(upsample(f, h, w) for f in ps).clamp(-bound, bound)
            return warp_images(x, disp)
        if family == "tone":
            return tone_map(x, ps[0])
        if family == "additive":
            return additive(x, ps[0], self._additive_eps(), fine=ps[1])
        raise AssertionError(family)

    @torch.no_grad()
    def _update(
        self, family: str, ps: list[torch.Tensor], grads: list[torch.Tensor], x: torch.Tensor
    ) -> list[torch.Tensor]:
        """One signed-gradient ascent step of a universal family, then its projection."""
        opt = self.options
        h, w = x.shape[-2:]
        if family == "mask":
            m = ps[0] + opt["mask_step"] * grads[0].sign()
            if len(ps) > 2:  # the window the mask must stay in
                m = m * ps[2]
            m = project_area(m, opt["mask_area"] * h * w)
            p = (ps[1] + opt["pattern_step"] * grads[1].sign()).clamp(0.0, 1.0)
            return [m, p, *ps[2:]]
        if family == "warp":
            b = opt["warp_bound"] * min(h, w)
            return [(f + b / 4 * gr.sign()).clamp(-b, b) for f, gr in zip(ps, grads)]
        if family == "tone":
            b = opt["tone_bound"]
            return [(ps[0] + b / 4 * grads[0].sign()).clamp(-b, b)]
        b = self._additive_eps()
        return [(p + b / 4 * gr.sign()).clamp(-b, b) for p, gr in zip(ps, grads)]

    # ------------------------------------------------------------------ the attack
    @property
    def needs_anchors_to_begin(self) -> bool:
        """Whether :meth:`begin` reads the anchors' values (the first batch's mask scan); otherwise
        it reads only their number of rows, and :meth:`ascend` their values."""
        scans_again = self.options["rescan_every"] > 0  # the epoch is not known here: any batch may
        return self.options["mask_weight"] > 0 and (self._params is None or scans_again)

    def begin(self, inp: AttackInputs) -> _Attack:
        """Start the attack of one batch: the families' rows, the per-sample starts and this turn's
        universal parameters (the mask scan on the very first batch)."""
        cfg = self.config
        x = inp.x.detach()
        families = self.active_families(x)
        if self._params is None:
            self._init_params(inp, families)
            self._scanned_epoch = inp.epoch
        elif self._rescan_due(inp.epoch, families):
            # the masks start again from a scan of the current encoder: what the fine-tuning has not
            # removed yet may sit where the refined masks no longer look
            self._params["mask"] = self._scan(inp)
            self._scanned_epoch = inp.epoch
        assert self._params is not None
        fam = self._assign(inp, families)
        rows = {f: (fam == i).nonzero().squeeze(1) for i, f in enumerate(families)}
        turn = self._calls  # each family uses its sets in turn: set (turn mod its number of sets)
        uni = {
            f: [t.to(x.device) for t in self._params[f][turn % len(self._params[f])]]
            for f in families
            if f not in _PER_SAMPLE and self._params.get(f)
        }
        # per-sample PGD rows: random start in the eps ball (per-sample randomness, as "pgd")
        eps = float(cfg.epsilon)
        idx_p = rows.get("pgd")
        x_p0 = x_p = None
        if idx_p is not None and idx_p.numel() > 0:
            x_p0 = x[idx_p].contiguous()  # the PGD rows' ball centres, gathered once per batch
            u = per_sample_uniform(
                inp.indices[idx_p], x.shape[1:], seed=int(cfg.seed), epoch=inp.epoch, stream=_START_STREAM
            )
            x_p = random_start(x_p0, u, eps) if eps > 0 else x_p0.clone()
        # sparse rows: start at the clean images (delta = 0; the first step picks the pixels)
        idx_s = rows.get("sparse")
        x_s0 = x_s = None
        if idx_s is not None and idx_s.numel() > 0:
            x_s0 = x[idx_s].contiguous()
            x_s = x_s0.clone()
        h, w = x.shape[-2:] if x.dim() == 4 else (1, 1)
        return _Attack(
            inp=inp,
            x=x,
            families=families,
            fam=fam,
            rows=rows,
            turn=turn,
            uni=uni,
            x_rows={f: x[r] for f, r in rows.items() if f in uni},  # each family's clean rows, once
            idx_p=idx_p,
            x_p0=x_p0,
            x_p=x_p,
            idx_s=idx_s,
            x_s0=x_s0,
            x_s=x_s,
            sparse_pixels=max(1, round(self.options["sparse_area"] * h * w)),
            stats=torch.zeros(len(families), 2, dtype=torch.float64, device=x.device),
        )

    def compose(self, st: _Attack, *, leaves: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The adversarial batch [B, C, H, W] from the attack's current state.

        With ``leaves`` the per-sample images and the universal parameters become fresh leaves that
        require gradient (returned in the order :meth:`ascend` expects); without, ``[]`` and no graph.
        """
        x = st.x
        x_pgd = None if st.x_p is None else st.x_p.detach().requires_grad_(leaves)
        x_sparse = None if st.x_s is None else st.x_s.detach().requires_grad_(leaves)
        params = {f: [t.detach().requires_grad_(leaves) for t in ps] for f, ps in st.uni.items()}
        out = x.clone()
        pieces, where = [], []
        for xs, idx in ((x_pgd, st.idx_p), (x_sparse, st.idx_s)):
            if xs is not None:
                pieces.append(xs)
                where.append(idx)
        for f, ps in params.items():
            r = st.rows[f]
            if r.numel() > 0:
                pieces.append(self._apply(f, st.x_rows[f], ps))
                where.append(r)
        if pieces:
            order = torch.cat(where)
            # scatter the families' rows back into the batch order (differentiable in the pieces)
            out = out.index_put((order,), torch.cat([p.to(x.dtype) for p in pieces]))
        if not leaves:
            return out.detach(), []
        vars_ = [v for v in (x_pgd, x_sparse) if v is not None] + [t for ps in params.values() for t in ps]
        return out, vars_

    @torch.no_grad()
    def ascend(
        self, st: _Attack, leaves: list[torch.Tensor], grads: list[torch.Tensor | None], z: torch.Tensor
    ) -> None:
        """One ascent step of every family from ``grads`` (the gradient of a loss the adversary
        maximises, w.r.t. :meth:`compose`'s ``leaves``; None: unused), then the projections.

        ``z`` [B, D]: the features of the composed batch the gradient was taken at, for the strength
        statistics (each family's mean ``1 - cos(f(x'), f(x))``).
        """
        cfg = self.config
        grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
        shift = 1.0 - F.cosine_similarity(z.detach().float(), st.inp.local_clean_features.float(), dim=1)
        st.stats.zero_()
        st.stats[:, 0].index_add_(0, st.fam, shift.double())
        st.stats[:, 1].index_add_(0, st.fam, torch.ones_like(shift, dtype=torch.float64))
        st.stepped = True
        if st.x_p is not None:
            g_p, grads = grads[0], grads[1:]
            assert st.x_p0 is not None
            st.x_p = st.x_p.detach()
            pgd_step(
                st.x_p,
                g_p.contiguous(),
                st.x_p0,
                float(cfg.step_size),
                float(cfg.epsilon),
                backend=cfg.backend,
            )
        if st.x_s is not None:
            g_s, grads = grads[0], grads[1:]
            self._sparse_ascend(st, g_s)
        flat = torch.cat([gr.reshape(-1) for gr in grads]) if grads else None
        if flat is not None and st.inp.reduce is not None:
            flat = st.inp.reduce(flat)  # the global gradient of the universal parameters
        j = 0
        for f, ps in st.uni.items():
            gs = []
            for t in ps:
                assert flat is not None
                gs.append(flat[j : j + t.numel()].view_as(t))
                j += t.numel()
            st.uni[f] = self._update(f, ps, gs, st.x)

    def _head_divergence(
        self, st: _Attack, z: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``head_attack * sum_i KL(h(a_i) || h(z_i)) / B_global``: how far the head's predictions on
        the attacked features ``z`` [n, D] (this rank's rows, or its ``rows`` [n] of the batch) have
        moved from its predictions on the same images' clean anchors ``a``, in the units of the
        NT-Xent mean (0-dim float32; 0 without a head or with ``head_attack`` 0). No label is read:
        the targets are the model's own clean predictions."""
        w, inp = float(self.options["head_attack"]), st.inp
        if w == 0.0 or inp.head is None:
            return z.new_zeros(())
        if st.head_target is None:
            with torch.no_grad():
                st.head_target = inp.head(inp.local_clean_features.float()).float().log_softmax(1)
        target = st.head_target if rows is None else st.head_target[rows]
        log_q = inp.head(z).float().log_softmax(1)
        kl = F.kl_div(log_q, target, log_target=True, reduction="sum")
        return w * kl / inp.clean_features.shape[0]

    def _sparse_only_steps(self, st: _Attack, z: torch.Tensor, extra: int) -> None:
        """``extra`` more steps of the sparse rows alone: each forwards only those rows; the other
        rows keep ``z`` [B, D] float32 (detached), the features of the last shared forward (taken
        before that step's update: no extra forward for them), in the same NT-Xent batch. A sparse
        row's gradient is then the whole-batch loss's with the other families stopped
        (``tests/core/test_trigger_search.py``). Every rank runs the same number of gathers (a rank
        without sparse rows forwards nothing); the sparse family's strength statistic is taken at
        the last of these steps."""
        cfg, inp = self.config, st.inp
        fam_s = st.families.index("sparse")
        for _ in range(extra):
            zb = z.clone()
            leaf = None
            if st.x_s is not None and st.idx_s is not None and st.idx_s.numel() > 0:
                leaf = st.x_s.detach().requires_grad_(True)
                zs = inp.encoder(leaf).flatten(1).float()
                zb = zb.index_put((st.idx_s,), zs)
            zg = inp.gather(zb) if inp.gather is not None else zb
            loss = nt_xent(zg, inp.clean_features.to(zg.dtype), cfg.temperature, backend=cfg.backend)
            if leaf is None:
                continue
            loss = loss + self._head_divergence(st, zs, st.idx_s)
            (g_s,) = torch.autograd.grad(loss, [leaf])
            with torch.no_grad():
                shift = 1.0 - F.cosine_similarity(
                    zs.detach(), inp.local_clean_features[st.idx_s].float(), dim=1
                )
                st.stats[fam_s, 0] = shift.double().sum()
                self._sparse_ascend(st, g_s)

    def _sparse_ascend(self, st: _Attack, g_s: torch.Tensor) -> None:
        """One step of the sparse rows from their gradient ``g_s`` [n_s, C, H, W] (``sparse_step``)."""
        assert st.x_s is not None and st.x_s0 is not None
        st.x_s = sparse_step(st.x_s0, st.x_s.detach(), g_s, self.options["sparse_step"], st.sparse_pixels)

    def end(self, st: _Attack) -> None:
        """Keep the refined universal parameters and update the strengths from the (global)
        statistics of the last :meth:`ascend`."""
        stats = st.stats
        if st.inp.reduce is not None:
            stats = st.inp.reduce(stats)
        for f, ps in st.uni.items():
            assert self._params is not None
            self._params[f][st.turn % len(self._params[f])] = [t.detach() for t in ps]
        mom = self.options["share_momentum"]
        cpu = stats.cpu()
        for i, f in enumerate(st.families):
            if st.stepped and cpu[i, 1] > 0:
                v = float(cpu[i, 0] / cpu[i, 1])
                self._strength[f] = v if f not in self._strength else mom * self._strength[f] + (1 - mom) * v
        self._calls += 1

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        """``steps`` ascent steps on ``NTXent(f(x'), clean anchors)`` (eval mode, input-only
        gradients; plus the head's divergence, :meth:`_head_divergence`, with ``head_attack`` > 0
        and a known head); returns the detached adversarial batch."""
        cfg = self.config
        st = self.begin(inp)
        steps = int(cfg.steps)
        shared = min(steps, self.options["batch_steps"] or steps)
        with attack_mode(inp.encoder), torch.enable_grad():
            z = None
            for _ in range(shared):
                x_adv, leaves = self.compose(st, leaves=True)
                z = inp.encoder(x_adv).flatten(1).float()
                zg = inp.gather(z) if inp.gather is not None else z
                loss = nt_xent(zg, inp.clean_features.to(zg.dtype), cfg.temperature, backend=cfg.backend)
                loss = loss + self._head_divergence(st, z)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else []
                self.ascend(st, leaves, list(grads), z)
            if steps > shared and z is not None and "sparse" in st.families:
                self._sparse_only_steps(st, z.detach(), steps - shared)
        x_adv, _ = self.compose(st, leaves=False)
        self.end(st)
        return x_adv


@dataclass
class _Attack:
    """One batch's attack state (:meth:`TriggerSearch.begin`): the family of each row, the
    per-sample images (PGD and sparse rows, with their clean centres) and the universal parameters
    of this turn, refined by :meth:`TriggerSearch.ascend`."""

    inp: AttackInputs
    x: torch.Tensor
    families: list[str]
    fam: torch.Tensor
    rows: dict[str, torch.Tensor]
    turn: int
    uni: dict[str, list[torch.Tensor]]
    x_rows: dict[str, torch.Tensor]
    idx_p: torch.Tensor | None
    x_p0: torch.Tensor | None
    x_p: torch.Tensor | None
    idx_s: torch.Tensor | None
    x_s0: torch.Tensor | None
    x_s: torch.Tensor | None
    sparse_pixels: int
    stats: torch.Tensor
    stepped: bool = False
    head_target: torch.Tensor | None = None  # [B, K] log h(anchors), for head_attack (lazily)
