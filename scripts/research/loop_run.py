#!/usr/bin/env python
"""Run cbd_fast.purify (the real loop) with overrides on a backdoored model; evaluate; log JSON.

python scripts/research/loop_run.py MODEL ATTACK TAG key=value ...   (values parsed as Python literals)
"""

import ast
import json
import sys
import time

import torch
from torch import nn

from cbd_fast import Purifier
from cbd_fast.evaluation.backdoors import trigger_for
from cbd_fast.evaluation.fmnist import load_fashion_mnist, split_unlabeled
from cbd_fast.evaluation.metrics import evaluate_backdoor, linear_probe
from cbd_fast.evaluation.models import load_model

torch.set_num_threads(1)
path, attack, tag = sys.argv[1:4]
ov = {}
for kv in sys.argv[4:]:
    k, v = kv.split("=", 1)
    try:
        ov[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        ov[k] = v
train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
g = torch.Generator().manual_seed(123)
ti = torch.randperm(len(test), generator=g)[:2000]
tx, ty = test.images[ti], test.labels[ti]
trig = trigger_for(attack)
model = load_model(path)
ssl = attack == "badencoder"


def ev(bb):
    clf = (
        linear_probe(bb, train.images[:10000], train.labels[:10000]) if ssl else nn.Sequential(bb, model.head)
    )
    return evaluate_backdoor(clf, tx, ty, trig)


before = ev(model.backbone)
seed = int(ov.pop("data_seed", 0))
if "pull_ratio" in ov:
    from cbd_fast.core.clean_terms import OriginalAnchor

    OriginalAnchor.pull_ratio = float(ov["pull_ratio"])
    rec_ratio = ov.pop("pull_ratio")
ux, _ = split_unlabeled(train, 0.05, seed=seed)
t0 = time.perf_counter()
res = Purifier(progress=False, **ov).fit(model.backbone, ux)
secs = time.perf_counter() - t0
after = ev(res.encoder)
rec = {
    "tag": tag,
    "loop": True,
    "model": path,
    "attack": attack,
    "overrides": {**ov, "pull_ratio": globals().get("rec_ratio", 0.2)},
    "before": before,
    "after": after,
    "secs": round(secs, 1),
    "hist": [{k: round(v, 4) for k, v in h.items() if k.startswith("loss")} for h in res.history],
}
print(json.dumps(rec))
with open("scripts/research/runs.jsonl", "a") as fh:
    fh.write(json.dumps(rec) + "\n")
