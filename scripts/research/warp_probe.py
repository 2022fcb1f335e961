#!/usr/bin/env python
"""Probe the universal-warp search alone on a frozen backdoored encoder (labels only to evaluate).

    python scripts/research/warp_probe.py runs/models/wanet_seed0.pt [restarts] [warp_pixels] [grid]

For each random start, the warp adversary's update (signed steps on a shared flow field against
NT-Xent(f(warp(x)), f(x)), 5 steps per batch of 43 unlabeled images, 24 batches) runs on the frozen
encoder; then the share of 2,000 non-target test images that the original head sends to the target
class under the found warp (the backdoor's evocation), and the label-free score used to rank starts
(relative feature shift ||f(x') - f(x)||^2 / ||f(x)||^2 on 64 unlabeled images) are printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cbd_fast.evaluation.fmnist import load_fashion_mnist, split_unlabeled  # noqa: E402
from cbd_fast.evaluation.models import load_model  # noqa: E402
from cbd_fast.ops import nt_xent  # noqa: E402

torch.set_num_threads(1)


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    ident = torch.stack([xs, ys], -1)[None]
    scale = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)])
    up = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=True)
    grid = (ident + up.permute(0, 2, 3, 1) * scale).clamp(-1, 1).expand(n, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def main() -> None:
    path = sys.argv[1]
    restarts = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    smax = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
    grid = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    model = load_model(path)
    enc, head = model.backbone, model.head
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    ux, _ = split_unlabeled(train, 0.05, seed=0)
    nt = test.labels != 0
    tx = test.images[nt][:2000]
    with torch.no_grad():
        z_ref = enc(ux[:64])
        den = z_ref.pow(2).sum(1).mean()
    from cbd_fast.evaluation.backdoors import WaNet

    wn = WaNet()
    gt = torch.Generator().manual_seed(wn.seed)
    true_flow = torch.rand(1, 2, wn.k, wn.k, generator=gt) * 2 - 1  # only compared with a 4x4 search
    for r in range(restarts):
        g = torch.Generator().manual_seed(r)
        flow = (torch.rand(1, 2, grid, grid, generator=g) * 2 - 1) * smax
        for b in range(24):
            x = ux[128 * b : 128 * b + 43]
            with torch.no_grad():
                anchors = enc(x)
            for _ in range(5):
                flow = flow.detach().requires_grad_(True)
                loss = nt_xent(enc(warp(x, flow)), anchors, 0.5)
                (gr,) = torch.autograd.grad(loss, flow)
                flow = (flow.detach() + smax / 4 * gr.sign()).clamp(-smax, smax)
        with torch.no_grad():
            score = float((enc(warp(ux[:64], flow)) - z_ref).pow(2).sum(1).mean() / den)
            evoc = float((head(enc(warp(tx, flow))).argmax(1) == 0).float().mean())
            half = float((head(enc(warp(tx, 0.5 * flow))).argmax(1) == 0).float().mean())
        cos = float(F.cosine_similarity(flow.flatten(), true_flow.flatten(), dim=0))
        print(
            f"start {r}: score {score:.3f}  target rate {100 * evoc:.1f}% (half flow {100 * half:.1f}%)"
            f"  |flow| {flow.abs().mean():.2f}  cos(true trigger field) {cos:.2f}"
        )


if __name__ == "__main__":
    main()
