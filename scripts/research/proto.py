#!/usr/bin/env python
"""Research prototype of CBD variants (own loop; for finding defaults). Labels only for evaluation.

    python scripts/research/proto.py --model runs/models/badnets_seed0.pt --attack badnets --tag x \
        --adv pgd --eps 8 --steps 5 --pull ntxent --clean-w 1 --epochs 5
Appends one JSON line per run to scripts/research/runs.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.evaluation.backdoors import trigger_for
from cbd_fast.evaluation.fmnist import load_fashion_mnist, split_unlabeled
from cbd_fast.evaluation.metrics import evaluate_backdoor, linear_probe
from cbd_fast.evaluation.models import load_model
from cbd_fast.ops.reference import nt_xent_reference as ntx


def bn_eval(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()


def project_capped_simplex(m: torch.Tensor, budget: float) -> torch.Tensor:
    """Project m onto {0 <= m <= 1, sum m <= budget}."""
    m = m.clamp(0, 1)
    if m.sum() <= budget:
        return m
    lo, hi = 0.0, float(m.max())
    for _ in range(40):
        th = (lo + hi) / 2
        if (m - th).clamp(0, 1).sum() > budget:
            lo = th
        else:
            hi = th
    return (m - hi).clamp(0, 1)


class Adv:
    def __init__(self, a, shape):
        self.a = a
        c, h, w = shape
        self.delta = torch.zeros(1, c, h, w)
        self.mask = torch.zeros(1, 1, h, w)
        self.pat = torch.rand(1, c, h, w)

    def pgd(self, f, x, anchor, eps, steps, alpha):
        xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = ntx(f(xa), anchor, self.a.tau)
            (g,) = torch.autograd.grad(loss, xa)
            xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        return xa.detach()

    def upgd(self, f, x, anchor, eps, steps, alpha):
        d = self.delta
        if self.a.u_restart:
            d = torch.empty_like(d).uniform_(-eps, eps)
        for _ in range(steps):
            d.requires_grad_(True)
            loss = ntx(f((x + d).clamp(0, 1)), anchor, self.a.tau)
            (g,) = torch.autograd.grad(loss, d)
            d = (d.detach() + alpha * g.sign()).clamp(-eps, eps)
        self.delta = d.detach()
        return (x + self.delta).clamp(0, 1)

    def warp(self, f, x, anchor, steps, smax, kgrid=4):
        n, _, h, w = x.shape
        if not hasattr(self, "flow"):
            self.flow = torch.empty(1, 2, kgrid, kgrid).uniform_(-smax, smax)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        ident = torch.stack([xs, ys], -1)[None]
        scale = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)])

        def apply(fl):
            up = F.interpolate(fl, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            grid = (ident + up * scale).clamp(-1, 1).expand(n, h, w, 2)
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

        fl = self.flow
        for _ in range(steps):
            fl.requires_grad_(True)
            loss = ntx(f(apply(fl)), anchor, self.a.tau)
            (g,) = torch.autograd.grad(loss, fl)
            fl = (fl.detach() + smax / 4 * g.sign()).clamp(-smax, smax)
        self.flow = fl.detach()
        return apply(self.flow).detach()

    @torch.no_grad()
    def scan(self, f, x, k, top):
        c = f(x)
        den = c.pow(2).sum(1).mean()
        n, _, h, w = x.shape
        best = []
        for val in (0.0, 1.0):
            for r in range(h - k + 1):
                xs = []
                for q in range(w - k + 1):
                    xp = x.clone()
                    xp[..., r : r + k, q : q + k] = val
                    xs.append(xp)
                z = f(torch.cat(xs)).view(w - k + 1, n, -1)
                s = (z - c).pow(2).sum(2).mean(1) / den
                for q in range(w - k + 1):
                    best.append((s[q].item(), r, q, val))
        best.sort(reverse=True)
        self.scores = best
        self.patches = [(r, q, torch.full((1, x.shape[1], k, k), val)) for _, r, q, val in best[:top]]
        self.k = k

    def patch(self, f, x, anchor, steps, alpha, it):
        r, q, p = self.patches[it % len(self.patches)]
        k = self.k
        for _ in range(steps):
            p.requires_grad_(True)
            xa = x.clone()
            xa[..., r : r + k, q : q + k] = p.expand(len(x), -1, -1, -1)
            loss = ntx(f(xa), anchor, self.a.tau)
            (g,) = torch.autograd.grad(loss, p)
            p = (p.detach() + alpha * g.sign()).clamp(0, 1)
        self.patches[it % len(self.patches)] = (r, q, p.detach())
        xa = x.clone()
        xa[..., r : r + k, q : q + k] = p.expand(len(x), -1, -1, -1)
        return xa

    def mask_adv(self, f, x, anchor, budget, steps, lr):
        m, p = self.mask, self.pat
        for _ in range(steps):
            m.requires_grad_(True)
            p.requires_grad_(True)
            loss = ntx(f((1 - m) * x + m * p), anchor, self.a.tau)
            gm, gp = torch.autograd.grad(loss, (m, p))
            m = project_capped_simplex(m.detach() + lr * gm.sign(), budget)
            p = (p.detach() + lr * gp.sign()).clamp(0, 1)
        self.mask, self.pat = m.detach(), p.detach()
        return ((1 - self.mask) * x + self.mask * self.pat).detach()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--attack", required=True)
    p.add_argument("--tag", default="")
    p.add_argument("--adv", default="pgd", help="comma list of pgd,upgd,mask")
    p.add_argument("--eps", type=float, default=8)
    p.add_argument("--ueps", type=float, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget", type=float, default=16)
    p.add_argument("--mask-lr", type=float, default=0.1)
    p.add_argument("--warp-s", type=float, default=1.5)
    p.add_argument("--split", action="store_true")
    p.add_argument("--patch-k", type=int, default=3)
    p.add_argument("--patch-top", type=int, default=4)
    p.add_argument("--scan-n", type=int, default=16)
    p.add_argument("--u-restart", action="store_true")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--pull", default="ntxent", help="ntxent | mse0 | both")
    p.add_argument("--pull-w", type=float, default=1.0)
    p.add_argument("--clean-w", type=float, default=1.0)
    p.add_argument("--clean", default="mse0", help="mse0 | none")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--opt", default="sgd")
    p.add_argument("--bn", default="eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ntest", type=int, default=2000)
    p.add_argument("--bs", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    g = torch.Generator().manual_seed(123)
    ti = torch.randperm(len(test), generator=g)[: a.ntest]
    tx, ty = test.images[ti], test.labels[ti]
    trig = trigger_for(a.attack)
    model = load_model(a.model)
    ssl = a.attack == "badencoder"

    def evaluate(backbone):
        if ssl:
            clf = linear_probe(backbone, train.images[:10000], train.labels[:10000])
        else:
            clf = nn.Sequential(backbone, model.head)
        return evaluate_backdoor(clf, tx, ty, trig)

    before = evaluate(model.backbone)
    f0 = copy.deepcopy(model.backbone).eval().requires_grad_(False)
    f = copy.deepcopy(model.backbone)
    ux, _ = split_unlabeled(train, 0.05, seed=a.seed)
    with torch.no_grad():
        scale = f0(ux[:1000]).pow(2).sum(1).mean()

    def mse(u, v):
        return (u - v).pow(2).sum(1).mean() / scale

    params = [q for q in f.parameters() if q.requires_grad]
    opt = (
        torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=5e-4)
        if a.opt == "sgd"
        else torch.optim.Adam(params, lr=a.lr)
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs)
    advs = a.adv.split(",") if a.adv else []
    adv = Adv(a, ux.shape[1:])
    hist = []
    t0 = time.perf_counter()
    for _ep in range(a.epochs):
        perm = torch.randperm(len(ux))
        tot = {}
        for i in range(0, len(ux), a.bs):
            x = ux[perm[i : i + a.bs]]
            f.eval()
            with torch.no_grad():
                anchor = f(x)
                a0 = f0(x)
            views = []
            parts_in = (
                list(zip(x.chunk(len(advs)), anchor.chunk(len(advs))))
                if a.split
                else [(x, anchor)] * len(advs)
            )
            for kind, (x, anchor) in zip(advs, parts_in):
                if kind == "pgd":
                    views.append(
                        adv.pgd(
                            f,
                            x,
                            anchor,
                            a.eps / 255,
                            a.steps,
                            max(a.eps / 255 / 4, 0.5 / 255) if a.eps else 0,
                        )
                    )
                elif kind == "upgd":
                    views.append(adv.upgd(f, x, anchor, a.ueps / 255, a.steps, a.ueps / 255 / 4))
                elif kind == "mask":
                    views.append(adv.mask_adv(f, x, anchor, a.budget, a.steps, a.mask_lr))
                elif kind == "none":
                    views.append(x)
                elif kind == "patch":
                    if not hasattr(adv, "patches"):
                        adv.scan(f0, ux[: a.scan_n], a.patch_k, a.patch_top)
                        print("scan", adv.scores[:6], flush=True)
                    views.append(adv.patch(f, x, anchor, a.steps, 0.25, i // a.bs))
                elif kind == "warp":
                    views.append(adv.warp(f, x, anchor, a.steps, a.warp_s))
                elif kind == "oracle":
                    views.append(trig(x))
            x = ux[perm[i : i + a.bs]]
            if a.split:
                views = [torch.cat(views)]
            f.train()
            if a.bn == "eval":
                bn_eval(f)
            fx = f(x)
            loss = 0.0
            parts = {}
            for v in views:
                fa = f(v)
                if a.pull in ("ntxent", "both"):
                    l1 = ntx(fa, fx, a.tau)
                    parts["ntx"] = parts.get("ntx", 0) + l1.item()
                    loss = loss + l1
                if a.pull in ("mse0", "both"):
                    l2 = mse(fa, a0)
                    parts["pull_mse"] = parts.get("pull_mse", 0) + l2.item()
                    loss = loss + a.pull_w * l2
            if a.clean == "mse0" and a.clean_w > 0:
                lc = mse(fx, a0)
                parts["clean"] = lc.item()
                loss = loss + a.clean_w * lc
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in parts.items():
                tot[k] = tot.get(k, 0) + v
        sched.step()
        nb = (len(ux) + a.bs - 1) // a.bs
        hist.append({k: round(v / nb, 4) for k, v in tot.items()})
    secs = time.perf_counter() - t0
    after = evaluate(f)
    rec = {
        "tag": a.tag,
        "args": vars(a),
        "before": before,
        "after": after,
        "secs": round(secs, 1),
        "hist": hist,
        "mask_sum": float(adv.mask.sum()),
    }
    print(json.dumps(rec))
    with open("scripts/research/runs.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
