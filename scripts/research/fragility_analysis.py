#!/usr/bin/env python
"""Candidate head-free estimates of lost accuracy, on the features ``fragility_probe.py`` saved (research).

    python scripts/research/fragility_analysis.py [--m 256] [--draws 5]

For every stored run, on ``--draws`` random subsets of ``--m`` validation images (the size of the
health check's slice), prints the ACC drop, the real head's share of changed predictions (an oracle:
it needs the head) and the label-free candidates: the drift, and the share of images whose pseudo
class changes, where the pseudo classes are k-means clusters of the ORIGINAL features and an image's
class is its nearest centroid (a linear head built without labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def kmeans(z: torch.Tensor, k: int, *, seed: int = 0, iters: int = 30, restarts: int = 4) -> torch.Tensor:
    """[k, D] centroids of ``z`` [M, D] (k-means++ starts, Lloyd iterations, best of ``restarts``)."""
    g = torch.Generator().manual_seed(seed)
    best, best_cost = None, float("inf")
    for _ in range(restarts):
        c = z[torch.randint(len(z), (1,), generator=g)]
        for _ in range(1, k):
            d = torch.cdist(z, c).pow(2).min(1).values
            c = torch.cat([c, z[torch.multinomial(d / d.sum(), 1, generator=g)]])
        for _ in range(iters):
            a = torch.cdist(z, c).argmin(1)
            c = torch.stack([z[a == j].mean(0) if (a == j).any() else c[j] for j in range(k)])
        cost = float(torch.cdist(z, c).pow(2).min(1).values.sum())
        if cost < best_cost:
            best, best_cost = c, cost
    return best


def figures(z0: torch.Tensor, z: torch.Tensor, ks=()) -> dict[str, float]:
    from cbd_fast.core.health import health_figures

    lib = health_figures(z, z0)
    out = {"drift": lib["health_drift"], "flip": lib["health_flip"]}  # as the library computes them
    z0, z = z0.double(), z.double()
    for k in ks:
        c = kmeans(z0, k)
        a0, a1 = torch.cdist(z0, c).argmin(1), torch.cdist(z, c).argmin(1)
        out[f"nc{k}"] = float((a0 != a1).double().mean())
        # the same on unit-normalised features (a cosine head)
        u0, u = torch.nn.functional.normalize(z0, dim=1), torch.nn.functional.normalize(z, dim=1)
        cu = kmeans(u0, k)
        out[f"cos{k}"] = float(
            (torch.cdist(u0, cu).argmin(1) != torch.cdist(u, cu).argmin(1)).double().mean()
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--ks", default="", help="also other cluster counts, e.g. 5,20 (research variants)")
    p.add_argument("--json", default=None, help="write the per-run figures here")
    args = p.parse_args()
    rows = [
        json.loads(x) for x in (ROOT / "runs/fragility/results.jsonl").read_text().splitlines() if x.strip()
    ]
    table = []
    for r in rows:
        d = torch.load(ROOT / r["features"])
        g = torch.Generator().manual_seed(1)
        draws = []
        for _ in range(args.draws):
            idx = torch.randperm(len(d["z0"]), generator=g)[: args.m]
            draws.append(figures(d["z0"][idx], d["z"][idx], ks=[int(k) for k in args.ks.split(",") if k]))
        fig = {k: sum(x[k] for x in draws) / len(draws) for k in draws[0]}
        fig_rng = {k: (min(x[k] for x in draws), max(x[k] for x in draws)) for k in draws[0]}
        drop = 100 * (r["before"]["acc"] - r["after"]["acc"])
        flips = float((d["p0"] != d["p"]).double().mean())
        table.append(
            {
                "arch": r["arch"],
                "zoo": r.get("zoo"),
                "purpose": r.get("purpose", "tune"),
                "tag": r["tag"],
                "attack": r["attack"],
                "kind": r["kind"],
                "drop": drop,
                "head_flip": flips,
                "asr": 100 * r["after"]["asr"],
                **fig,
                "range": fig_rng,
                "hdrift": r["history_last"].get("health_drift"),
            }
        )
    table.sort(key=lambda t: t["drop"])
    keys = [
        k
        for k in table[0]
        if k not in ("arch", "zoo", "purpose", "tag", "attack", "kind", "drop", "range", "hdrift", "asr")
    ]
    print(
        f"{'arch':18s} {'tag':9s} {'attack':16s} {'drop':>5s} {'asr':>5s} "
        + " ".join(f"{k:>9s}" for k in keys)
    )
    for t in table:
        print(
            f"{t['arch'] + ('@' + Path(t['zoo']).name if t['zoo'] else ''):18s} {t['tag']:9s} "
            f"{t['attack'] + ('*' if t['purpose'] == 'report' else ''):16s} {t['drop']:5.1f} {t['asr']:5.1f} "
            + " ".join(f"{t[k]:9.3f}" for k in keys)
        )
    print("(* a held-out check on a report model: not in the dev table below)")
    print("\n| settings | arch | runs | `health_drift` | `health_flip` | head's changed predictions | drop |")
    print("|---|---|---|---|---|---|---|")
    groups: dict[tuple, list] = {}
    for t in (t for t in table if t["purpose"] != "report"):
        arch = t["arch"] + (f" ({Path(t['zoo']).name})" if t["zoo"] else "")
        groups.setdefault((t["tag"], arch, t["kind"] == "encoder"), []).append(t)

    def rng(ts: list, key: str, fmt: str = "{:.3f}") -> str:
        lo, hi = min(x[key] for x in ts), max(x[key] for x in ts)
        return fmt.format(lo) + " to " + fmt.format(hi)

    for (tag, arch, enc), ts in sorted(groups.items()):
        print(
            f"| {tag}{' (encoder attack)' if enc else ''} | {arch} | {len(ts)} | {rng(ts, 'drift')} "
            f"| {rng(ts, 'flip')} | {rng(ts, 'head_flip')} | {rng(ts, 'drop', '{:.1f}')} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
