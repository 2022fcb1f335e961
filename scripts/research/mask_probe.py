"""Does a universal mask+pattern adversary with a contrastive (label-free) objective find the trigger?

    python scripts/research/mask_probe.py runs/models/badnets_seed0.pt ntx 16 150
    # MODEL OBJECTIVE(ntx | mse | collapse) L1_BUDGET_PIXELS STEPS

Prints JSON: the mask's mass, its share in the bottom-right 4x4 corner and the share of 1,000 masked
test images the original head sends to the target class 0 (no labels are read).
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

from cbd_fast.evaluation.fmnist import load_fashion_mnist
from cbd_fast.evaluation.models import load_model
from cbd_fast.ops.reference import nt_xent_reference as ntx

torch.set_num_threads(1)
path, obj, budget, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
m = load_model(path)
f = m.backbone.eval().requires_grad_(False)
tr = load_fashion_mnist("train", limit=4000)
x_all = tr.images
lm = torch.full((1, 1, 28, 28), -3.0, requires_grad=True)
lp = torch.zeros(1, 1, 28, 28, requires_grad=True)
opt = torch.optim.Adam([lm, lp], lr=0.1)
t = time.time()
for _it in range(steps):
    x = x_all[torch.randint(0, len(x_all), (128,))]
    with torch.no_grad():
        c = f(x)
    mask = torch.sigmoid(lm)
    pat = torch.sigmoid(lp)
    xa = (1 - mask) * x + mask * pat
    z = f(xa)
    if obj == "ntx":
        gain = ntx(z, c, 0.5)
    elif obj == "mse":
        gain = (z - c).pow(2).sum(1).mean() / c.pow(2).sum(1).mean()
    elif obj == "collapse":  # features of all x' agree with each other (cosine), away from own clean
        zn = F.normalize(z, dim=1)
        gain = (zn @ zn.T).mean() - F.cosine_similarity(z, c).mean()
    pen = F.relu(mask.sum() - budget)
    loss = -gain + 1.0 * pen
    opt.zero_grad()
    loss.backward()
    opt.step()
mask = torch.sigmoid(lm).detach()
pat = torch.sigmoid(lp).detach()
te = load_fashion_mnist("test", limit=1000)
xa = (1 - mask) * te.images + mask * pat
pred = m(xa).argmax(1)
br = mask[..., 24:, 24:].sum() / mask.sum()
print(
    json.dumps(
        {
            "obj": obj,
            "budget": budget,
            "steps": steps,
            "mask_sum": mask.sum().item(),
            "bottom_right_share": br.item(),
            "target_share": (pred == 0).float().mean().item(),
            "pred_hist": torch.bincount(pred, minlength=10).tolist(),
            "secs": time.time() - t,
        }
    )
)
