#!/usr/bin/env python
"""Why a backdoor survives ``purify``: the trigger's size, and what the search reached, on one zoo model.

    python scripts/diagnose_miss.py --arch fmnistnet --attack trojannn --seed 3

For one stored zoo model (``scripts/train_zoo.py``) it prints one JSON line:

- the test trigger's footprint on 512 of the defender's images: median L-inf and L2 of the change,
  and the share of pixels changed by more than 1/255 (a sparse, high-amplitude trigger changes a
  few percent of the pixels by up to 1.0);
- ``trigger_shift_before`` / ``_after``: the mean feature shift ``1 - cos(f(x + trigger), f(x))`` of
  the backbone before and after a default ``purify`` run on the defender's 3,000 images (the
  trigger still moving the features after the run is the backdoor that is left);
- ``family_strength_end``: each search family's measured strength (the same ``1 - cos``) at the end
  of the run, and ``scan_top``: the mask scan's four best squares (score, top, left, side, fill).

A diagnostic of a reported result, not a choice: nothing here changes a default. About 1-2 minutes
per model on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 512


def _shift(encoder, a, b) -> float:  # noqa: ANN001
    import torch

    with torch.no_grad():
        return float((1 - torch.nn.functional.cosine_similarity(encoder(a), encoder(b))).mean())


def diagnose(arch: str, attack: str, seed: int, zoo: Path) -> dict:
    import torch

    import cbd_fast
    from cbd_fast.core.checkpoint import load_latest
    from cbd_fast.evaluation.fmnist import load_fashion_mnist
    from cbd_fast.evaluation.protocol import defender_images
    from cbd_fast.evaluation.zoo.build import load_build

    model, trigger, _ = load_build(zoo / arch / f"{attack}_seed{seed}")
    x_def, _ = defender_images(load_fashion_mnist("train"), 0.05, seed=seed)
    x = x_def[:N_IMAGES]
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    x_trig = trigger(x)
    change = (x_trig - x).flatten(1)
    out: dict = {
        "arch": arch,
        "attack": attack,
        "seed": seed,
        "trigger_linf_median": round(float(change.abs().amax(1).median()), 3),
        "trigger_l2_median": round(float(change.norm(dim=1).median()), 3),
        "trigger_changed_pixels": round(float((change.abs() > 1 / 255).float().mean()), 4),
        "trigger_shift_before": round(_shift(model.backbone, x_trig, x), 3),
    }
    with tempfile.TemporaryDirectory() as ckpt:
        fit = cbd_fast.Purifier(None, seed=seed, progress=False, checkpoint_dir=ckpt).fit(
            model.backbone, x_def
        )
        found = load_latest(ckpt)
    assert found is not None, "purify wrote no checkpoint"
    adversary = found[1]["adversary"]
    out["trigger_shift_after"] = round(_shift(fit.encoder, x_trig, x), 3)
    out["family_strength_end"] = {k: round(v, 3) for k, v in adversary.get("strength", {}).items()}
    out["scan_top"] = [[round(s[0], 3), *s[1:]] for s in adversary.get("scan_scores", [])[:4]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fmnistnet")
    p.add_argument("--attack", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--zoo", type=Path, default=ROOT / "runs" / "zoo")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    try:
        print(json.dumps(diagnose(args.arch, args.attack, args.seed, args.zoo)), flush=True)
    except FileNotFoundError as exc:
        print(
            f"{exc} (train it first: python scripts/train_zoo.py --attacks {args.attack} "
            f"--archs {args.arch} --seeds {args.seed})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
