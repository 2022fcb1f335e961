"""Scan constant k x k patches (white / black) over every position; score = relative feature shift.

    python scripts/research/patch_scan.py runs/models/badnets_seed0.pt 3     # MODEL K

Scores 64 unlabeled training images on the frozen backbone and prints the median score and the top 8
patches (value, row, column, score) as JSON. Labels are not used.
"""

import json
import sys
import time

import torch

from cbd_fast.evaluation.fmnist import load_fashion_mnist
from cbd_fast.evaluation.models import load_model

torch.set_num_threads(1)
path, k = sys.argv[1], int(sys.argv[2])
m = load_model(path)
f = m.backbone.eval()
x = load_fashion_mnist("train", limit=64).images
t = time.time()
with torch.no_grad():
    c = f(x)
    den = c.pow(2).sum(1).mean()
    scores = {}
    for val in (0.0, 1.0):
        for r in range(0, 29 - k):
            xs = []
            for q in range(0, 29 - k):
                xp = x.clone()
                xp[..., r : r + k, q : q + k] = val
                xs.append(xp)
            z = f(torch.cat(xs)).view(29 - k, 64, -1)
            s = (z - c).pow(2).sum(2).mean(1) / den
            for q in range(29 - k):
                scores[(val, r, q)] = s[q].item()
top = sorted(scores.items(), key=lambda kv: -kv[1])[:8]
vals = torch.tensor(list(scores.values()))
print(
    json.dumps(
        {"k": k, "secs": time.time() - t, "median": vals.median().item(), "top": [[*kk, v] for kk, v in top]}
    )
)
