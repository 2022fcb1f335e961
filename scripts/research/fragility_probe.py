#!/usr/bin/env python
"""Save the clean features of dev runs, to study head-free estimates of lost accuracy (research).

    python scripts/research/fragility_probe.py --arch fmnistnet --tag lr4 --set lr=0.006 --jobs 2

For each dev attack's tuning-seed model (the protocol's dev half only, as ``scripts/tune_defaults.py``)
it runs ``purify`` with the drift limit off and ``health="warn"`` (so that every encoder comes back,
damaged or not), then stores, for the first 2,000 validation images (``--report``: a held-out
check on a report model, its seed and the test images):
``z0`` / ``z`` (the original's and the purified encoder's features, float32), ``p0`` / ``p`` (the
classifier's predictions through the original head, or a linear probe for encoder attacks) and the
labels, in ``runs/fragility/{arch}/{tag}_{attack}.pt``, and one JSON line (ACC / ASR before and
after on the 5,000 validation images, the last epoch's health figures) in
``runs/fragility/results.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
OUT = ROOT / "runs" / "fragility"
N_FEAT = 2000


def run_one(
    attack: str,
    seed: int,
    overrides: dict,
    tag: str,
    arch: str,
    purpose: str = "tune",
    zoo: str | None = None,
) -> dict:
    import torch
    import tune_defaults

    torch.set_num_threads(1)
    if zoo:
        tune_defaults.ZOO_ROOT = ROOT / zoo

    from cbd_fast import Purifier, PurifyConfig
    from cbd_fast.app.demo import _classifier
    from cbd_fast.evaluation.metrics import evaluate_backdoor
    from cbd_fast.evaluation.zoo import get_attack

    images = "validation" if purpose == "tune" else "test"
    model, trigger, head, probe, val, x_unl = tune_defaults.load_case(attack, seed, arch, purpose)
    clf0 = _classifier(model.backbone, head, probe)
    before = evaluate_backdoor(clf0, val.images, val.labels, trigger)
    cfg = PurifyConfig(
        **{"seed": seed, "progress": False, "health": "warn", "health_max_drift": 1e9, **overrides}
    ).validate()
    t0 = time.perf_counter()
    fit = Purifier(cfg).fit(model.backbone, x_unl, head=False if head is None else head)
    secs = time.perf_counter() - t0
    clf1 = _classifier(fit.encoder, head, probe)
    after = evaluate_backdoor(clf1, val.images, val.labels, trigger)
    x = val.images[:N_FEAT].float().div(255) if val.images.dtype == torch.uint8 else val.images[:N_FEAT]
    with torch.no_grad():
        model.backbone.eval(), fit.encoder.eval()
        z0, z = model.backbone(x).float(), fit.encoder(x).float()
        p0, p = clf0(x).argmax(1), clf1(x).argmax(1)
    path = OUT / (arch + (f"@{Path(zoo).name}" if zoo else "")) / f"{tag}_{attack}_seed{seed}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"z0": z0, "z": z, "p0": p0, "p": p, "y": val.labels[:N_FEAT]}, path)
    last = fit.history[-1] if fit.history else {}
    return {
        "purpose": purpose,
        "images": images,
        "tag": tag,
        "arch": arch,
        "zoo": zoo,
        "attack": attack,
        "seed": seed,
        "overrides": overrides,
        "kind": get_attack(attack).kind,
        "before": before,
        "after": after,
        "seconds": secs,
        "features": str(path.relative_to(ROOT)),
        "history_last": {k: v for k, v in last.items() if isinstance(v, (int, float))},
    }


def _describe(r: dict) -> str:
    return (
        f"{r['arch']} {r['tag']} {r['attack']}: ACC {100 * r['before']['acc']:.1f} -> "
        f"{100 * r['after']['acc']:.1f}  ASR {100 * r['before']['asr']:.1f} -> "
        f"{100 * r['after']['asr']:.1f}  drift {r['history_last'].get('health_drift', float('nan')):.3f} "
        f"({r['seconds']:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    from tune_defaults import DEV_ATTACKS, _parse_set, run_jobs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="defaults")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--attacks", default=",".join(DEV_ATTACKS))
    p.add_argument("--arch", default="fmnistnet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--zoo", default=None, help="another zoo folder under the repository (e.g. runs/zoo-e1)")
    p.add_argument("--report", action="store_true", help="a held-out check: report seeds, test images")
    args = p.parse_args(argv)
    overrides = _parse_set(args.set)
    purpose = "report" if args.report else "tune"
    calls = [
        (a, args.seed, overrides, args.tag, args.arch, purpose, args.zoo) for a in args.attacks.split(",")
    ]
    run_jobs(run_one, calls, args.jobs, OUT / "results.jsonl", _describe)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
