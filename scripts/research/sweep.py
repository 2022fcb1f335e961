#!/usr/bin/env python
"""Run one candidate CBD setting on several attacks x seeds (full 10k test set); log JSON lines.

    python scripts/research/sweep.py TAG --attacks wanet,blended --seeds 0,1,2 --jobs 2 \
        --set epochs=5 --extra warp_pixels=3

``--set`` overrides ``PurifyConfig`` fields, ``--extra`` sets ``adversary_options`` (the adversary's
settings). Same data split as ``scripts/run_evaluation.py`` (``split_unlabeled(train, 0.05, seed)``,
the cached backdoored models in ``runs/models``). Labels only to evaluate. Records go to
``scripts/research/runs.jsonl``.
"""

from __future__ import annotations

import argparse
import ast
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _kv(items: list[str]) -> dict:
    out = {}
    for kv in items:
        k, v = kv.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def one(job: tuple) -> dict:
    attack, seed, sets, extra = job
    import torch
    from torch import nn

    torch.set_num_threads(1)
    from cbd_fast import Purifier, PurifyConfig
    from cbd_fast.evaluation.backdoors import trigger_for
    from cbd_fast.evaluation.fmnist import load_fashion_mnist, split_unlabeled
    from cbd_fast.evaluation.metrics import evaluate_backdoor, linear_probe
    from cbd_fast.evaluation.models import load_model

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    model = load_model(ROOT / "runs" / "models" / f"{attack}_seed{seed}.pt")
    trig = trigger_for(attack)
    ssl = attack == "badencoder"

    def ev(bb: nn.Module) -> dict:
        probe = (train.images[:10000], train.labels[:10000])
        clf = linear_probe(bb, *probe) if ssl else nn.Sequential(bb, model.head)
        return evaluate_backdoor(clf, test.images, test.labels, trig)

    before = ev(model.backbone)
    ux, _ = split_unlabeled(train, 0.05, seed=seed)
    opts = {"adversary_options": dict(extra)} if extra else {}
    cfg = PurifyConfig(**{"seed": seed, "progress": False, **sets, **opts}).validate()
    t0 = time.perf_counter()
    res = Purifier(cfg).fit(model.backbone, ux)
    secs = time.perf_counter() - t0
    after = ev(res.encoder)
    return {"attack": attack, "seed": seed, "before": before, "after": after, "secs": round(secs, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tag")
    p.add_argument("--attacks", default="wanet,blended")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--extra", nargs="*", default=[])
    a = p.parse_args()
    sets, extra = _kv(a.set), _kv(a.extra)
    jobs = [(at, int(s), sets, extra) for at in a.attacks.split(",") for s in a.seeds.split(",")]
    with mp.get_context("spawn").Pool(a.jobs) as pool:
        recs = pool.map(one, jobs, chunksize=1)
    by: dict[str, list] = {}
    for r in recs:
        by.setdefault(r["attack"], []).append(r)
        print(
            f"{a.tag} {r['attack']}/{r['seed']}: ACC {100 * r['before']['acc']:.1f}->"
            f"{100 * r['after']['acc']:.1f} ASR {100 * r['before']['asr']:.1f}->"
            f"{100 * r['after']['asr']:.1f} ({r['secs']} s)"
        )
    for at, rs in by.items():
        drop = statistics.mean(100 * (r["before"]["acc"] - r["after"]["acc"]) for r in rs)
        asr = statistics.mean(100 * r["after"]["asr"] for r in rs)
        print(f"{a.tag} {at} MEAN: ASR {asr:.1f}  ACC drop {drop:.2f}")
    with open(ROOT / "scripts" / "research" / "runs.jsonl", "a") as fh:
        for r in recs:
            fh.write(json.dumps({"tag": a.tag, "sweep": True, "set": sets, "extra": extra, **r}) + "\n")


if __name__ == "__main__":
    main()
