#!/usr/bin/env python
"""Score CBD settings on the DEV attacks only (the held-out protocol's tuning half).

    python scripts/tune_defaults.py --tag search --set adversary=trigger_search --jobs 2
    python scripts/tune_defaults.py --tag search_e6 --set adversary=trigger_search epochs=6
    python scripts/tune_defaults.py --tag r8 --arch resnet8 --attacks badnets,pixels

Runs ``cbd_fast.purify`` (the library defaults, updated with ``--set``) on every dev attack's
tuning-seed model (``cbd_fast.evaluation.protocol``: dev attacks, tuning seeds, validation
images; anything else is refused) and appends one JSON line per (attack, seed) to
``runs/tune/results.jsonl``: ACC / ASR before and after on the 5,000 validation images, the
seconds and the settings. ``--arch`` picks the dev models' architecture: ``fmnistnet`` (default)
or another zoo architecture, whose dev models all come from the zoo (``runs/zoo/{arch}``, trained
when missing). ``--summary`` prints a table of every tag (and architecture) tried.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "tune" / "results.jsonl"
ZOO_ROOT = ROOT / "runs" / "zoo"
#: the five attacks of ``backdoors.py`` (their models come from ``app.demo.load_or_train``)
BACKDOOR_ATTACKS = ("badnets", "blended", "sig", "wanet", "badencoder")
#: the dev attacks built by the zoo only (their models come from ``runs/zoo/fmnistnet``, trained when missing)
ZOO_DEV_ATTACKS = ("pixels", "random_location")
DEV_ATTACKS = BACKDOOR_ATTACKS + ZOO_DEV_ATTACKS


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def run_one(attack: str, seed: int, overrides: dict, tag: str, arch: str = "fmnistnet") -> dict:
    import torch

    torch.set_num_threads(1)
    from cbd_fast import Purifier, PurifyConfig
    from cbd_fast.app.demo import _classifier
    from cbd_fast.core.health import HealthError
    from cbd_fast.evaluation.metrics import evaluate_backdoor

    model, trigger, head, probe, val, x_unl = load_case(attack, seed, arch)

    def evaluate(backbone):
        return evaluate_backdoor(_classifier(backbone, head, probe), val.images, val.labels, trigger)

    before = evaluate(model.backbone)
    cfg = PurifyConfig(**{"seed": seed, "progress": False, **overrides}).validate()
    record = {"tag": tag, "arch": arch, "attack": attack, "seed": seed, "overrides": overrides}
    record["before"] = before
    t0 = time.perf_counter()
    try:
        fit = Purifier(cfg).fit(model.backbone, x_unl)
    except HealthError as exc:  # a run the health check stopped is a result: no encoder came back
        return record | {
            "after": None,
            "error": f"HealthError: {str(exc)[:400]}",
            "seconds": time.perf_counter() - t0,
        }
    secs = time.perf_counter() - t0
    last = fit.history[-1] if fit.history else {}
    return record | {
        "after": evaluate(fit.encoder),
        "seconds": secs,
        "history_last": {k: v for k, v in last.items() if isinstance(v, (int, float))},
    }


def load_case(attack: str, seed: int, arch: str = "fmnistnet", purpose: str = "tune"):  # noqa: ANN201
    """``(model, trigger, head, probe, images, x_unlabeled)`` of one (attack, seed, arch), as the
    protocol allows for ``purpose``: "tune" (dev attacks, tuning seeds, validation images) or
    "report" (report seeds, test images). ``head`` is None for encoder attacks, which are read
    through a linear probe trained on ``probe`` (10,000 clean labelled training images)."""
    from cbd_fast.app.demo import load_or_train
    from cbd_fast.evaluation.backdoors import trigger_for
    from cbd_fast.evaluation.fmnist import load_fashion_mnist
    from cbd_fast.evaluation.protocol import check_purpose, defender_images, split_test_set
    from cbd_fast.evaluation.zoo import get_attack

    images = "validation" if purpose == "tune" else "test"
    check_purpose(purpose, split_of_attack=get_attack(attack).split, seed=seed, images=images)
    train = load_fashion_mnist("train")
    val = split_test_set(load_fashion_mnist("test"), images)
    if arch == "fmnistnet" and attack in BACKDOOR_ATTACKS:
        model = load_or_train(attack, seed, train=train, cache_dir=ROOT / "runs" / "models", progress=False)
        trigger = trigger_for(attack)
    else:
        model, trigger = _zoo_model(attack, arch, seed, train)
    ssl = get_attack(attack).kind == "encoder"
    head = None if ssl else model.head
    probe = (train.images[:10000], train.labels[:10000]) if ssl else None
    x_unl, _ = defender_images(train, 0.05, seed=seed)
    return model, trigger, head, probe, val, x_unl


def _zoo_model(attack: str, arch: str, seed: int, train):  # noqa: ANN001, ANN202
    """``(model, trigger)`` of a zoo-built dev attack on ``arch``, trained and stored when missing."""
    from cbd_fast.evaluation.zoo.build import build_record, load_build, save_build

    stem = ZOO_ROOT / arch / f"{attack}_seed{seed}"
    try:
        model, trigger, _ = load_build(stem)
    except FileNotFoundError:
        save_build(build_record(attack, arch, train, seed=seed), stem)
        model, trigger, _ = load_build(stem)
    return model, trigger


def summary() -> None:
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]
    tags: dict[str, list[dict]] = {}
    for r in rows:
        arch = r.get("arch", "fmnistnet")
        tags.setdefault(r["tag"] if arch == "fmnistnet" else f"{r['tag']}@{arch}", []).append(r)
    print(f"{'tag':28s} " + " ".join(f"{a:>16s}" for a in DEV_ATTACKS) + "   meanASR  maxdACC")
    for tag, rs in tags.items():
        by = {r["attack"]: r for r in rs}
        cells = []
        for a in DEV_ATTACKS:
            r = by.get(a)
            if r is None:
                cells.append(f"{'-':>11s}")
            elif r["after"] is None:
                cells.append("stopped")
            else:
                cells.append(f"{100 * r['after']['acc']:5.1f}/{100 * r['after']['asr']:5.1f}")
        done = [r for r in rs if r["after"] is not None]
        asr = [100 * r["after"]["asr"] for r in done] or [float("nan")]
        dacc = [100 * (r["before"]["acc"] - r["after"]["acc"]) for r in done] or [float("nan")]
        print(
            f"{tag:28s} "
            + " ".join(f"{c:>16s}" for c in cells)
            + f"   {statistics.mean(asr):6.1f}  {max(dacc):6.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="defaults")
    p.add_argument("--set", nargs="*", default=[], help="PurifyConfig overrides, key=value")
    p.add_argument(
        "--attacks", default=",".join(BACKDOOR_ATTACKS), help=f"comma-separated, from {DEV_ATTACKS}"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="fmnistnet", help="the dev models' architecture (a zoo architecture)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summary", action="store_true")
    args = p.parse_args(argv)
    if args.summary:
        summary()
        return 0
    overrides = _parse_set(args.set)
    attacks = args.attacks.split(",")
    bad = [a for a in attacks if a not in DEV_ATTACKS]
    if bad:
        raise SystemExit(f"--attacks: {bad} are not dev attacks; tuning may use only {DEV_ATTACKS}")
    from cbd_fast.evaluation.architectures import ARCHITECTURES

    if args.arch not in ARCHITECTURES:
        raise SystemExit(f"--arch: {args.arch!r} is not a zoo architecture; one of {sorted(ARCHITECTURES)}")
    run_jobs(
        run_one, [(a, args.seed, overrides, args.tag, args.arch) for a in attacks], args.jobs, OUT, _describe
    )
    return 0


def _describe(r: dict) -> str:
    if r["after"] is None:
        return f"{r['tag']} {r['attack']}: stopped: {r['error'][:160]}"
    return (
        f"{r['tag']} {r['attack']}: "
        f"ACC {100 * r['before']['acc']:.1f} -> {100 * r['after']['acc']:.1f}  "
        f"ASR {100 * r['before']['asr']:.1f} -> {100 * r['after']['asr']:.1f}  "
        f"({r['seconds']:.0f} s)"
    )


def run_jobs(fn, calls: list[tuple], jobs: int, out: Path, describe) -> None:  # noqa: ANN001
    """``fn(*call)`` for every call, ``jobs`` processes side by side; each result (a dict) is appended
    to ``out`` as one JSON line as soon as it is done, and ``describe(result)`` printed."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max(1, jobs)) as ex:
        for f in as_completed([ex.submit(fn, *call) for call in calls]):
            r = f.result()
            with out.open("a") as fh:
                fh.write(json.dumps(r, default=str) + "\n")
            print(describe(r), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
