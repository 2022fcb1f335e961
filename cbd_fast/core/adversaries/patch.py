"""A label-free universal patch search beside per-sample PGD (``adversary="pgd_patch"``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from cbd_fast.core.adversaries.base import Adversary, AttackInputs, Option, register_adversary
from cbd_fast.core.adversaries.pgd import ContrastivePGD
from cbd_fast.core.modes import attack_mode
from cbd_fast.ops.nt_xent import nt_xent

__all__ = ["PGDAndPatch", "PATCH_OPTIONS"]


PATCH_OPTIONS: dict[str, Option] = {
    "patch_size": Option(
        None, int, 1, doc="side k of the scanned square patches; None: max(3, min(H, W) / 10)"
    ),
    "patch_stride": Option(None, int, 1, doc="scan stride; None: at most 32 positions per axis"),
    "patch_candidates": Option(4, int, 1, doc="best-scoring patches kept, used round robin"),
    "patch_scan_images": Option(16, int, 1, doc="images of the first batch scored by the scan"),
}


@register_adversary("pgd_patch")
class PGDAndPatch(Adversary):
    """Per-sample contrastive PGD on one half of the batch, a universal patch adversary on the other.

    Triggers are sample-agnostic shortcuts of two kinds (``docs/results.md``): global ones (blends,
    signals, warps) that a per-sample L-inf attack of radius ``epsilon`` evokes, and local patches
    that no small L-inf ball reaches (a white patch on a black corner needs a change of 1.0). The
    patch half looks for the latter label-free: on its first call it scans constant ``k x k`` patches
    (black and white, every position with stride ``patch_stride``) over a few images and keeps the
    ``patch_candidates`` positions whose patch moves the features most (relative squared shift
    ``||f(x') - f(x)||^2 / ||f(x)||^2``; a patch trigger is a 100x outlier); then on every batch it
    pastes one of those patches (round robin) on its images and refines the patch's pixels, shared by
    the images, with ``steps`` signed-gradient steps of size 0.25 on NT-Xent(f(x'), clean anchors).

    Settings (``PurifyConfig.adversary_options``): ``patch_size``, ``patch_stride``,
    ``patch_candidates``, ``patch_scan_images`` and ``patch_fraction`` (share of the batch given to the
    patch half, default 0.5); see ``OPTIONS``. The scan runs once, on the first batch; the found
    patches, their refined pixels and the round-robin counter are the adversary's
    :meth:`state_dict`, saved in checkpoints, so a resumed run continues exactly (no rescan).

    Distributed: the PGD half uses global negatives (every rank's PGD half, via ``inputs.gather``),
    as the plain ``"pgd"`` adversary does. The patch half is rank-local: each rank scans its own
    first batch, refines its own patches against its own anchors, and the batch halves are taken
    per rank, so a multi-rank run does not reproduce a one-process run bit for bit (use
    ``adversary="pgd"`` for that). Checkpoints are written by rank 0, so a resumed multi-rank run
    continues every rank from rank 0's patches.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        **PATCH_OPTIONS,
        "patch_fraction": Option(0.5, float, 0.0, 1.0, doc="share of each batch given to the patch half"),
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # the PGD half is the plain "pgd" adversary (the options here are not its settings)
        self._pgd = ContrastivePGD(dataclasses.replace(config, adversary="pgd", adversary_options=None))
        self._patches: list[tuple[int, int, torch.Tensor]] | None = None
        self._k = 0
        self._calls = 0
        self.scan_scores: list[tuple[float, int, int, float]] = []

    @torch.no_grad()
    def _scan(self, encoder: nn.Module, x: torch.Tensor) -> None:
        opt = self.options
        _, c, h, w = x.shape
        k = opt["patch_size"] if opt["patch_size"] is not None else max(3, round(min(h, w) / 10))
        k = max(1, min(k, h, w))
        stride = opt["patch_stride"] or max(1, (max(h, w) - k + 1) // 32)
        x = x[: opt["patch_scan_images"]].float()
        rows, cols = list(range(0, h - k + 1, stride)), list(range(0, w - k + 1, stride))
        with attack_mode(encoder):
            # 1. reference features of the clean images and their mean squared norm.
            z0 = encoder(x).flatten(1).float()
            den = z0.pow(2).sum(1).mean().clamp_min(1e-12)
            scores: list[tuple[float, int, int, float]] = []
            for val in (0.0, 1.0):
                for r in rows:
                    # 2. one forward for a whole row of patch positions: [len(cols) * n] images.
                    xs = x.unsqueeze(0).repeat(len(cols), 1, 1, 1, 1)
                    for j, q in enumerate(cols):
                        xs[j, :, :, r : r + k, q : q + k] = val
                    z = encoder(xs.flatten(0, 1)).flatten(1).float().view(len(cols), x.shape[0], -1)
                    # 3. score = relative squared feature shift, averaged over the images.
                    s = (z - z0).pow(2).sum(2).mean(1) / den
                    scores += [(float(s[j]), r, q, val) for j, q in enumerate(cols)]
        scores.sort(reverse=True)
        self.scan_scores = scores[:16]
        top = opt["patch_candidates"]
        self._patches = [
            (r, q, torch.full((1, c, k, k), val, device=x.device)) for _, r, q, val in scores[:top]
        ]
        self._k = k

    def _paste(self, x: torch.Tensor, r: int, q: int, p: torch.Tensor) -> torch.Tensor:
        k = self._k
        out = x.clone()
        out[:, :, r : r + k, q : q + k] = p.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``patches`` (None before the scan, else a list of {row, col, pixels [1, C, k, k] CPU}),
        ``k``, ``calls`` (the round-robin counter) and ``scan_scores``."""
        patches = None
        if self._patches is not None:
            patches = [{"row": r, "col": q, "pixels": p.detach().cpu().clone()} for r, q, p in self._patches]
        return {
            "patches": patches,
            "k": self._k,
            "calls": self._calls,
            "scan_scores": [list(s) for s in self.scan_scores],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the pixels move to the images' device on use)."""
        patches = state["patches"]
        self._patches = (
            None
            if patches is None
            else [(int(d["row"]), int(d["col"]), d["pixels"].clone()) for d in patches]
        )
        self._k = int(state["k"])
        self._calls = int(state["calls"])
        self.scan_scores = [(float(a), int(b), int(c), float(d)) for a, b, c, d in state["scan_scores"]]

    def _patch_attack(self, inp: AttackInputs, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        assert self._patches is not None
        i = self._calls % len(self._patches)
        r, q, p = self._patches[i]
        p = p.to(x.device)
        cfg = self.config
        with attack_mode(inp.encoder), torch.enable_grad():
            for _ in range(cfg.steps if x.shape[0] >= 2 else 0):
                p = p.detach().requires_grad_(True)
                z = inp.encoder(self._paste(x, r, q, p)).flatten(1).float()
                loss = nt_xent(z, anchors, cfg.temperature, backend=cfg.backend)
                (g,) = torch.autograd.grad(loss, p)
                # p <- clip(p + 0.25 * sign(g), 0, 1): the patch pixels are unbounded in [0, 1].
                p = (p.detach() + 0.25 * g.sign()).clamp(0.0, 1.0)
        self._patches[i] = (r, q, p.detach())
        return self._paste(x, r, q, p.detach()).detach()

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        b = inp.x.shape[0]
        if self._patches is None:
            self._scan(inp.encoder, inp.x)
        n_patch = int(round(b * self.options["patch_fraction"]))
        n_pgd = b - n_patch
        parts = []
        if n_pgd > 0:
            parts.append(self._pgd(inp.part(0, n_pgd, global_negatives=True)))
        if n_patch > 0:
            parts.append(self._patch_attack(inp, inp.x[n_pgd:], inp.local_clean_features[n_pgd:b]))
        self._calls += 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]
