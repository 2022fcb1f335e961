"""Universal smooth warps beside per-sample PGD and the patch search (``adversary="pgd_patch_warp"``,
the default)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from cbd_fast.core.adversaries.base import AttackInputs, Option, register_adversary
from cbd_fast.core.adversaries.patch import PATCH_OPTIONS, PGDAndPatch
from cbd_fast.core.adversaries.transforms import upsample, warp_images
from cbd_fast.core.modes import attack_mode
from cbd_fast.ops.nt_xent import nt_xent

__all__ = ["PGDPatchWarp"]


@register_adversary("pgd_patch_warp")
class PGDPatchWarp(PGDAndPatch):
    """``pgd_patch`` plus a universal smooth-warp adversary; each batch is split PGD / patch / warp.

    Warping triggers (WaNet) move pixels instead of adding to them, which an L-inf ball reaches only
    partly. The warp part applies a flow field shared by its images: a ``4 x 4`` grid of 2-D
    displacements (pixels, each within ``+-warp_pixels``) upsampled bicubically to the image, sampled
    bilinearly. ``warp_restarts`` such fields persist across batches (seeded random starts from
    ``config.seed``) and take turns, one per batch; the batch's field takes ``warp_steps`` (None:
    ``config.steps``) signed-gradient steps of ``warp_pixels / 4`` on NT-Xent(f(x'), clean anchors).
    Several fields keep the fine-tuning from becoming invariant to one warp only. The fields are part
    of the :meth:`state_dict` (checkpointed).

    Split: ``patch_fraction`` (default 1/6) and ``warp_fraction`` (1/2) of each batch, rounded down,
    go to the patch and warp parts, the rest (1/3) to per-sample PGD; a lone PGD image (NT-Xent needs
    a negative) joins the warp part. Distributed: as ``pgd_patch`` (PGD part global, patch and warp
    parts rank-local).

    Why these defaults and what each measured: ``docs/method.md``.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        **PATCH_OPTIONS,
        "warp_pixels": Option(1.5, float, 0.0, doc="bound of each flow control displacement, in pixels"),
        "warp_restarts": Option(4, int, 1, doc="persistent flow fields, used in turn"),
        "warp_steps": Option(None, int, 0, doc="signed-gradient steps per batch; None: config.steps"),
        "patch_fraction": Option(1 / 6, float, 0.0, 1.0, doc="share of each batch given to the patch part"),
        "warp_fraction": Option(1 / 2, float, 0.0, 1.0, doc="share of each batch given to the warp part"),
    }

    @classmethod
    def check_combination(cls, options: dict[str, Any]) -> None:
        """The patch and warp shares leave the rest of the batch to PGD: their sum must be <= 1."""
        total = options["patch_fraction"] + options["warp_fraction"]
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"adversary_options patch_fraction + warp_fraction of adversary {cls.name!r} must be <= 1; "
                f"got {options['patch_fraction']} + {options['warp_fraction']} = {total}"
            )

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._flow: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        """``pgd_patch``'s state plus ``flow`` (None before the first batch, else
        [warp_restarts, 2, 4, 4] float32 CPU)."""
        state = super().state_dict()
        state["flow"] = None if self._flow is None else self._flow.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        super().load_state_dict(state)
        flow = state["flow"]
        self._flow = None if flow is None else flow.clone()

    def _warp_apply(self, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Warp ``x`` [n, C, H, W] with ``flow`` [1, 2, g, g] (displacements in pixels, x then y)."""
        return warp_images(x, upsample(flow, x.shape[-2], x.shape[-1]))

    def _warp_attack(self, inp: AttackInputs, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        cfg, opt = self.config, self.options
        smax, m = opt["warp_pixels"], opt["warp_restarts"]
        steps = cfg.steps if opt["warp_steps"] is None else opt["warp_steps"]
        if self._flow is None:
            g = torch.Generator().manual_seed(int(cfg.seed) + 7919)
            self._flow = ((torch.rand(m, 2, 4, 4, generator=g) * 2 - 1) * smax).to(x.device)
        i = self._calls % self._flow.shape[0]  # this batch's field
        flow = self._flow[i : i + 1].to(x.device)
        with attack_mode(inp.encoder), torch.enable_grad():
            for _ in range(steps if x.shape[0] >= 2 else 0):
                flow = flow.detach().requires_grad_(True)
                z = inp.encoder(self._warp_apply(x, flow)).flatten(1).float()
                loss = nt_xent(z, anchors, cfg.temperature, backend=cfg.backend)
                (g,) = torch.autograd.grad(loss, flow)
                flow = (flow.detach() + smax / 4 * g.sign()).clamp(-smax, smax)
        self._flow = self._flow.clone()
        self._flow[i : i + 1] = flow.detach().to(self._flow.device)
        return self._warp_apply(x, flow.detach()).detach()

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        b = inp.x.shape[0]
        n_patch = int(b * self.options["patch_fraction"] + 1e-9)
        n_warp = int(b * self.options["warp_fraction"] + 1e-9)
        if self._patches is None and n_patch > 0:
            self._scan(inp.encoder, inp.x)
        n_pgd = b - n_patch - n_warp
        if n_pgd == 1:  # NT-Xent needs a negative: a lone PGD image joins the warp (else patch) part
            n_pgd = 0
            if n_warp > 0 or n_patch == 0:
                n_warp += 1
            else:
                n_patch += 1
        parts = [self._pgd(inp.part(0, n_pgd, global_negatives=True))] if n_pgd > 0 else []
        local = inp.local_clean_features
        if n_patch > 0:
            sl = slice(n_pgd, n_pgd + n_patch)
            parts.append(self._patch_attack(inp, inp.x[sl], local[sl]))
        if n_warp > 0:
            sl = slice(n_pgd + n_patch, b)
            parts.append(self._warp_attack(inp, inp.x[sl], local[sl]))
        self._calls += 1
        return torch.cat(parts)
