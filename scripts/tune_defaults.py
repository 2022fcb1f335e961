#!/usr/bin/env python
"""Score CBD settings on the DEV attacks only (the held-out protocol's tuning half).

    python scripts/tune_defaults.py --tag search --set adversary=trigger_search --jobs 2
    python scripts/tune_defaults.py --tag search_e6 --set adversary=trigger_search epochs=6
    python scripts/tune_defaults.py --tag r8 --arch resnet8 --attacks badnets,pixels
    python scripts/tune_defaults.py --tag base --attacks badnets,wanet --run-seeds 0,1,2
    python scripts/tune_defaults.py --tag base --removal-test --run-seeds 0,1,2,3,4,5,6,7,8,9

Runs ``cbd_fast.purify`` (the library defaults, updated with ``--set``) on every dev attack's
tuning-seed model (``cbd_fast.evaluation.protocol``: dev attacks, tuning seeds, validation
images; anything else is refused) and appends one JSON line per (attack, seed) to
``runs/tune/results.jsonl``: ACC / ASR before and after on the 5,000 validation images, the
seconds and the settings. ``--arch`` picks the dev models' architecture: ``fmnistnet`` (default)
or another zoo architecture, whose dev models all come from the zoo (``runs/zoo/{arch}``, trained
when missing). ``--run-seeds`` runs each attack once per ``PurifyConfig.seed`` (default: the model's
seed): one run is noisy (``docs/method.md`` 4.21), so a choice should average several.
``--summary`` prints a table of every tag (and architecture) tried, each cell the mean over the run
seeds recorded for it (the latest record of each run seed).

``--removal-test`` runs the library's removal test instead (the setting of
``tests/core/test_purify.py::test_purify_removes_a_backdoor_and_keeps_clean_behaviour``: a +-0.1
blended-pattern backdoor in a small CNN, 192 unlabeled images, batch 32, 6 epochs; the test asks for
ASR after < 30%) with the ``--set`` overrides, once per run seed, and appends to
``runs/tune/removal_test.jsonl``; ``--summary`` then also prints each tag's ASR over the run seeds.
The test itself runs seed 0 only, and its ASR varies a lot with the seed (``docs/method.md`` 4.22):
a setting is judged on several.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "tune" / "results.jsonl"
REMOVAL_OUT = ROOT / "runs" / "tune" / "removal_test.jsonl"
#: the removal test's limit on the ASR after (tests/core/test_purify.py)
REMOVAL_LIMIT = 0.3
ZOO_ROOT = ROOT / "runs" / "zoo"
#: the five attacks of ``backdoors.py`` (their models come from ``app.demo.load_or_train``)
BACKDOOR_ATTACKS = ("badnets", "blended", "sig", "wanet", "badencoder")
#: the dev attacks built by the zoo only (their models come from ``runs/zoo/fmnistnet``, trained when missing)
ZOO_DEV_ATTACKS = ("pixels", "random_location", "adversarial_patch", "reflection", "ban", "poison_ink")
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


def run_one(
    attack: str, seed: int, overrides: dict, tag: str, arch: str = "fmnistnet", run_seed: int | None = None
) -> dict:
    """One defense run of the dev model (``attack``, model ``seed``, ``arch``) with the defaults updated
    by ``overrides``; ``PurifyConfig.seed`` is ``run_seed`` (None: the model's seed) unless
    ``overrides`` sets it. Returns the JSON record (``run_seed`` included)."""
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
    cfg_seed = seed if run_seed is None else run_seed
    cfg = PurifyConfig(**{"seed": cfg_seed, "progress": False, **overrides}).validate()
    record = {"tag": tag, "arch": arch, "attack": attack, "seed": seed, "run_seed": cfg.seed}
    record["overrides"] = overrides
    record["before"] = before
    t0 = time.perf_counter()
    try:  # the model's head, for the health check's changed predictions (none for encoder attacks)
        fit = Purifier(cfg).fit(model.backbone, x_unl, head=False if head is None else head)
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
        "head_change": None if head is None else head_change(model.backbone, fit.encoder, head, val.images),
        "seconds": secs,
        "history_last": {k: v for k, v in last.items() if isinstance(v, (int, float))},
    }


def head_change(original, purified, head, images) -> float:  # noqa: ANN001
    """The share of ``images`` whose prediction ``head`` changes from ``original``'s features to
    ``purified``'s: on the evaluation images, what the health check's ``health_head_change``
    measures on the defender's held-out images."""
    import torch

    from cbd_fast.core.features import batched_features

    with torch.no_grad():
        before = head(batched_features(original, images)).argmax(1)
        after = head(batched_features(purified, images)).argmax(1)
    return float((before != after).float().mean())


def run_removal_test(run_seed: int, overrides: dict, tag: str) -> dict:
    """The library's removal test with ``PurifyConfig.seed = run_seed`` and ``overrides`` on top of
    its own setting; returns the JSON record (``after``: ACC, ASR, trigger shift, clean drift)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from cbd_fast import PurifyConfig, purify
    from tests.core.test_purify import Backdoor

    backdoor = Backdoor()
    cfg = PurifyConfig(**{"batch_size": 32, "epochs": 6, "progress": False, "seed": run_seed, **overrides})
    t0 = time.perf_counter()
    # the model's head goes to the health check and, by default, guides the fine-tuning (method 4.23)
    after = backdoor.measure(
        purify(backdoor.model.backbone, backdoor.x[:192], cfg.validate(), head=backdoor.model.head)
    )
    return {
        "kind": "removal_test",
        "tag": tag,
        "run_seed": cfg.seed,
        "overrides": overrides,
        "before": backdoor.measure(backdoor.model.backbone),
        "after": after,
        "seconds": time.perf_counter() - t0,
    }


def summarize_removal(rows: list[dict]) -> list[dict]:
    """Per tag, over its run seeds (the latest record of each): ASR after (%) by run seed, mean, max
    and the number of seeds under the test's limit."""
    tags: dict[str, dict[int, float]] = {}
    for r in rows:
        tags.setdefault(r["tag"], {})[int(r["run_seed"])] = 100 * r["after"]["asr"]
    out = []
    for tag, by in tags.items():
        asr = [by[s] for s in sorted(by)]
        out.append(
            {
                "tag": tag,
                "run_seeds": sorted(by),
                "asr": asr,
                "mean_asr": statistics.mean(asr),
                "max_asr": max(asr),
                "passed": sum(a < 100 * REMOVAL_LIMIT for a in asr),
            }
        )
    return out


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


def _run_seed(r: dict) -> int:
    """The defense run's ``PurifyConfig.seed`` of a record (older records: from its overrides or the
    model seed)."""
    return int(r.get("run_seed", r.get("overrides", {}).get("seed", r["seed"])))


def summarize(rows: list[dict]) -> list[dict]:
    """One row per tag (``tag@arch`` off ``fmnistnet``): per dev attack the mean ACC / ASR (%) over
    its run seeds (the latest record of each run seed; None: not run; "stopped" when every run was
    stopped), the run count, the mean ASR over the finished runs and the largest ACC drop."""
    tags: dict[str, dict[tuple[str, int], dict]] = {}
    for r in rows:  # later records of the same (attack, run seed) replace earlier ones
        arch = r.get("arch", "fmnistnet")
        name = r["tag"] if arch == "fmnistnet" else f"{r['tag']}@{arch}"
        tags.setdefault(name, {})[(r["attack"], _run_seed(r))] = r
    out = []
    for name, by in tags.items():
        cells: dict[str, Any] = {}
        done = [r for r in by.values() if r["after"] is not None]
        for a in DEV_ATTACKS:
            rs = [r for (att, _), r in by.items() if att == a]
            fin = [r for r in rs if r["after"] is not None]
            if not rs:
                cells[a] = None
            elif not fin:
                cells[a] = "stopped"
            else:
                cells[a] = (
                    statistics.mean(100 * r["after"]["acc"] for r in fin),
                    statistics.mean(100 * r["after"]["asr"] for r in fin),
                )
        out.append(
            {
                "tag": name,
                "cells": cells,
                "runs": len(by),
                "run_seeds": sorted({s for _, s in by}),
                "mean_asr": statistics.mean(100 * r["after"]["asr"] for r in done) if done else math.nan,
                "max_acc_drop": max(
                    (100 * (r["before"]["acc"] - r["after"]["acc"]) for r in done), default=math.nan
                ),
            }
        )
    return out


def _read(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def summary() -> None:
    rows = _read(OUT)
    print(f"{'tag':28s} " + " ".join(f"{a:>16s}" for a in DEV_ATTACKS) + "   meanASR  maxdACC  run seeds")
    for row in summarize(rows):
        cells = []
        for a in DEV_ATTACKS:
            c = row["cells"][a]
            if c is None or isinstance(c, str):
                cells.append(c or "-")
            else:
                cells.append(f"{c[0]:5.1f}/{c[1]:5.1f}")
        print(
            f"{row['tag']:28s} "
            + " ".join(f"{c:>16s}" for c in cells)
            + f"   {row['mean_asr']:6.1f}  {row['max_acc_drop']:6.1f}  {','.join(map(str, row['run_seeds']))}"
        )
    removal = summarize_removal(_read(REMOVAL_OUT))
    if removal:
        print(f"\nremoval test (ASR after %, limit {100 * REMOVAL_LIMIT:.0f}):")
        for row in removal:
            seeds = " ".join(f"{s}:{a:.1f}" for s, a in zip(row["run_seeds"], row["asr"]))
            print(
                f"{row['tag']:28s} mean {row['mean_asr']:5.1f}  max {row['max_asr']:5.1f}  "
                f"passed {row['passed']}/{len(row['asr'])}  ({seeds})"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="defaults")
    p.add_argument("--set", nargs="*", default=[], help="PurifyConfig overrides, key=value")
    p.add_argument(
        "--attacks", default=",".join(BACKDOOR_ATTACKS), help=f"comma-separated, from {DEV_ATTACKS}"
    )
    p.add_argument("--seed", type=int, default=0, help="the dev models' seed (a tuning seed)")
    p.add_argument(
        "--run-seeds",
        default=None,
        help="comma-separated PurifyConfig seeds, one run of each attack per seed (default: --seed)",
    )
    p.add_argument("--arch", default="fmnistnet", help="the dev models' architecture (a zoo architecture)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summary", action="store_true")
    p.add_argument(
        "--removal-test",
        action="store_true",
        help="run the library's removal test (once per run seed) instead of the dev attacks",
    )
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
    try:
        run_seeds = [int(v) for v in args.run_seeds.split(",")] if args.run_seeds else [args.seed]
    except ValueError:
        raise SystemExit(f"--run-seeds must be comma-separated integers; got {args.run_seeds!r}") from None
    if "seed" in overrides and args.run_seeds:
        raise SystemExit("--run-seeds and --set seed=... both set PurifyConfig.seed; use one")
    if args.removal_test:
        seeds = [overrides.pop("seed")] if "seed" in overrides else run_seeds
        run_jobs(
            run_removal_test,
            [(s, overrides, args.tag) for s in seeds],
            args.jobs,
            REMOVAL_OUT,
            _describe_removal,
        )
        return 0
    calls = [(a, args.seed, overrides, args.tag, args.arch, rs) for rs in run_seeds for a in attacks]
    run_jobs(run_one, calls, args.jobs, OUT, _describe)
    return 0


def _describe(r: dict) -> str:
    if r["after"] is None:
        return f"{r['tag']} {r['attack']} (run seed {_run_seed(r)}): stopped: {r['error'][:160]}"
    return (
        f"{r['tag']} {r['attack']} (run seed {_run_seed(r)}): "
        f"ACC {100 * r['before']['acc']:.1f} -> {100 * r['after']['acc']:.1f}  "
        f"ASR {100 * r['before']['asr']:.1f} -> {100 * r['after']['asr']:.1f}  "
        f"({r['seconds']:.0f} s)"
    )


def _describe_removal(r: dict) -> str:
    a = r["after"]
    verdict = "passes" if a["asr"] < REMOVAL_LIMIT else "FAILS"
    return (
        f"{r['tag']} removal test (run seed {r['run_seed']}): ASR {100 * r['before']['asr']:.1f} -> "
        f"{100 * a['asr']:.1f} ({verdict}), ACC {100 * a['acc']:.1f}  ({r['seconds']:.0f} s)"
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
