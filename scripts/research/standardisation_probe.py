"""What purifying a backbone that expects standardised inputs costs without ``input_mean`` / ``input_std``.

    python scripts/research/standardisation_probe.py [--attacks badnets,blended] [--jobs 2]

A dev model (``FMNISTNet``, tuning seed 0, validation images) is turned, without training, into a
backbone that expects standardised images: ``g(z) = f(z * std + mean)`` with the Fashion-MNIST
statistics (mean 0.286, std 0.353), so that ``g(standardise(x)) = f(x)`` exactly. Its head reads
``g(standardise(x))``. ``purify`` then runs on the [0, 1] images (the defaults, the run seed 0):

- ``with``: ``input_mean`` / ``input_std`` set: every forward sees the standardised images, the run
  is the one on ``f`` (up to float rounding);
- ``without``: the images go in as given: ``g`` sees ``x``, i.e. ``f`` sees ``x * std + mean``, a
  low-contrast, brightened version of every image, for the attack, the fine-tuning and the health
  check alike.

ACC / ASR before and after are measured the way the model is used (standardised images). One JSON
line per run goes to ``runs/tune/standardisation.jsonl`` and is printed. Nothing is chosen on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

#: Fashion-MNIST training-set pixel statistics (the commonly quoted values)
MEAN, STD = 0.2860, 0.3530
OUT = ROOT / "runs" / "tune" / "standardisation.jsonl"


def run_one(attack: str, mode: str) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    from tune_defaults import load_case

    from cbd_fast import Purifier, PurifyConfig
    from cbd_fast.core.health import HealthError
    from cbd_fast.evaluation.metrics import evaluate_backdoor

    class ExpectsStandardised(nn.Module):
        """``g(z) = f(z * std + mean)``: the backbone as a model trained on standardised images."""

        def __init__(self, f: nn.Module) -> None:
            super().__init__()
            self.f = f

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.f(z * STD + MEAN)

    model, trigger, head, _, val, x_unl = load_case(attack, 0)
    assert head is not None, "a supervised dev attack"
    g = ExpectsStandardised(model.backbone)

    def evaluate(backbone: nn.Module) -> dict:
        clf = nn.Sequential(backbone, head).eval()
        return evaluate_backdoor(lambda x: clf((x - MEAN) / STD), val.images, val.labels, trigger)

    over = {"input_mean": (MEAN,), "input_std": (STD,)} if mode == "with" else {}
    cfg = PurifyConfig(seed=0, progress=False, health="warn", **over)
    rec = {"attack": attack, "mode": mode, "before": evaluate(g)}
    t0 = time.perf_counter()
    try:
        fit = Purifier(cfg).fit(g, x_unl)
    except HealthError as exc:  # (health="warn": not expected)
        return rec | {"after": None, "error": str(exc)[:300]}
    last = fit.history[-1]
    keys = ("health_knn", "health_drift", "health_flip")
    return rec | {
        "after": evaluate(fit.encoder),
        "seconds": time.perf_counter() - t0,
        "health": {k: last.get(k) for k in keys},
        "would_stop": bool(last.get("health_drift", 0) > cfg.health_max_drift)
        or bool(last.get("health_flip", 0) > cfg.health_max_flip),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="badnets,blended")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    from tune_defaults import run_jobs

    calls = [(a, m) for a in args.attacks.split(",") for m in ("with", "without")]
    run_jobs(run_one, calls, args.jobs, OUT, lambda r: json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
