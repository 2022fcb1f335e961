#!/usr/bin/env python
"""Train the backdoored Fashion-MNIST models the demo ships and the evaluation uses.

    python scripts/train_backdoor.py --attack badnets --seed 0 \
        --out cbd_fast/evaluation/assets/badnets_seed0.pt

Saves a float16 state_dict (~200 KB) of ``cbd_fast.evaluation.models.FMNISTNet`` and prints ACC/ASR (for
``badencoder``: of a linear probe on 10,000 clean training images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cbd_fast.evaluation.backdoors import build_backdoored_model, trigger_for
from cbd_fast.evaluation.fmnist import load_fashion_mnist
from cbd_fast.evaluation.metrics import evaluate_backdoor, linear_probe
from cbd_fast.evaluation.models import save_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", default="badnets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    t0 = time.perf_counter()
    model = build_backdoored_model(args.attack, train, seed=args.seed, epochs=args.epochs)
    secs = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, args.out)
    clf = model
    if args.attack == "badencoder":
        clf = linear_probe(model.backbone, train.images[:10000], train.labels[:10000])
    res = evaluate_backdoor(clf, test.images, test.labels, trigger_for(args.attack))
    print(json.dumps({"attack": args.attack, "seed": args.seed, "seconds": round(secs, 1), **res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
