#!/usr/bin/env python
"""Tune the label-using paper baselines on a DEV split: a small grid per method, one setting chosen.

    # the dev models of the tuning seed (0); writes benchmarks/results/baselines_tuned.json
    python scripts/tune_baselines.py --models cbd_fast/evaluation/assets/badnets_seed0.pt \\
        cbd_fast/evaluation/assets/wanet_seed0.pt

    # smoke test (seconds): 500 validation images, 300 defender images, a tiny grid
    python scripts/tune_baselines.py --models cbd_fast/evaluation/assets/badnets_seed0.pt \\
        --n-val 500 --n-defense 300 --methods fine_tuning anp \\
        --grid-json '{"fine_tuning": [{"epochs": 1}, {"epochs": 2}],
                      "anp": [{"iterations": 5, "threshold": 0.2}, {"iterations": 5, "threshold": 0.9}]}' \\
        --out /tmp/tune_smoke.json

Only what the caller passes is used: the ``--models`` (FMNISTNet state_dicts saved by
``cbd_fast.evaluation.models.save_model``; each with an ``--attack`` naming its test trigger through
``cbd_fast.evaluation.backdoors.trigger_for``, inferred from a ``<attack>_seed<k>.pt`` file name when not
given; dev attacks only) and the VALIDATION half of the test images (``protocol.split_test_set``),
images ``[val_start, val_start + n_val)`` of it, on which ACC and ASR are measured: the reported test
half is never touched. The defender's labeled clean set is drawn from the TRAINING set exactly as the
held-out evaluation draws its unlabeled set (``protocol.defender_images(train, --defense-fraction,
seed=--defense-seed)``, 5% = 3,000 images, independent of the poisoned indices), with its labels,
optionally cut to its first ``--n-defense`` images.

Per method, each grid setting (keyword arguments of the method) is run on every model; per model
``DER = metrics.defense_effectiveness_rate(ACC/ASR before, after)`` and the ACC drop (points). The
choice: the settings whose mean DER is within ``--tie-tol`` (0.005) of the best mean DER are tied;
among them those with mean ACC drop <= ``--max-acc-drop`` (2 points) are preferred; then the highest
mean DER, then the smallest ACC drop. The JSON holds every setting's per-model numbers, the choice and
the rule. ANP settings that differ only in ``threshold`` share one mask optimisation (the threshold is
applied afterwards, exactly as ``anp`` does).

Cost at the default grids, per FMNISTNet model and 3,000 defender images, measured wall time on one
thread of a busy 2-core machine: fine_tuning ~1.5 min, fine_pruning ~1 min, nad ~10 min, anp ~15 min
(two mask optimisations of 2,000 iterations), i_bau ~12 min: ~40 min per model. Tune on a few dev
models, not on the whole table.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: method -> the settings tried (keyword arguments; everything else at the method's defaults). The first
#: of each list is the paper's setting (the method's defaults).
DEFAULT_GRID: dict[str, list[dict[str, Any]]] = {
    "fine_tuning": [
        {"lr": 0.01, "epochs": 10},
        {"lr": 0.01, "epochs": 20},
        {"lr": 0.05, "epochs": 10},
    ],
    "fine_pruning": [{"acc_drop": 0.04}, {"acc_drop": 0.02}, {"acc_drop": 0.08}],
    "nad": [
        {"betas": [500.0, 1000.0, 1000.0]},
        {"betas": [250.0, 500.0, 500.0]},
        {"betas": [1000.0, 2000.0, 2000.0]},
        {"betas": [500.0, 1000.0, 1000.0], "lr": 0.03},
    ],
    "anp": [  # two mask optimisations (eps 0.4 and 0.2), thresholds applied afterwards
        {"eps": 0.4, "threshold": 0.2},
        {"eps": 0.4, "threshold": 0.4},
        {"eps": 0.4, "threshold": 0.6},
        {"eps": 0.2, "threshold": 0.2},
    ],
    "i_bau": [
        {"inner_lr": 10.0, "lr": 1e-3},
        {"inner_lr": 10.0, "lr": 1e-4},
        {"inner_lr": 1.0, "inner_passes": 3, "lr": 1e-3},
        {"inner_lr": 1.0, "inner_passes": 3, "lr": 1e-3, "portion": 0.1},
    ],
}

#: what each method's ``info`` contributes to the JSON (counts, not the full masks / activations)
DIAGNOSTICS = {
    "fine_tuning": ("steps",),
    "fine_pruning": ("layer", "channels", "pruned", "acc_base", "acc_pruned"),
    "nad": ("layers", "betas", "teacher_train_acc"),
    "anp": ("n_pruned",),
    "i_bau": ("delta_norm", "implicit_norm", "direct_norm"),
}


def _attack_from_name(path: str) -> str | None:
    m = re.match(r"([a-z]+)_seed\d+\.pt$", Path(path).name)
    return m.group(1) if m else None


def choose(settings: list[dict[str, Any]], *, tie_tol: float, max_acc_drop: float) -> int:
    """Index of the chosen setting (see the module docstring): ``settings[i]`` has ``mean_der`` and
    ``mean_acc_drop`` (fractions)."""
    best = max(s["mean_der"] for s in settings)
    tied = [i for i, s in enumerate(settings) if s["mean_der"] >= best - tie_tol]
    within = [i for i in tied if settings[i]["mean_acc_drop"] <= max_acc_drop]
    pool = within or tied
    return min(pool, key=lambda i: (-settings[i]["mean_der"], settings[i]["mean_acc_drop"], i))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cbd_fast.evaluation.baselines import LABELED_BASELINES

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", required=True, help="FMNISTNet state_dict files (save_model)")
    p.add_argument(
        "--attack",
        nargs="+",
        default=None,
        help="the attack of each model (one per model, or one for all; default: from <attack>_seed<k>.pt)",
    )
    p.add_argument("--val-start", type=int, default=0, help="first TEST image of the dev split (default 0)")
    p.add_argument("--n-val", type=int, default=2000, help="TEST images in the dev split (default 2000)")
    p.add_argument("--defense-fraction", type=float, default=0.05, help="share of the training set (0.05)")
    p.add_argument("--defense-seed", type=int, default=0, help="seed of the defender's draw (0)")
    p.add_argument("--n-defense", type=int, default=None, help="cut the defender's set to this many images")
    p.add_argument(
        "--methods", nargs="+", default=sorted(LABELED_BASELINES), choices=sorted(LABELED_BASELINES)
    )
    p.add_argument(
        "--grid-json", default=None, help="JSON {method: [settings, ...]} replacing the default grids"
    )
    p.add_argument("--seed", type=int, default=0, help="seed passed to every defense (0)")
    p.add_argument("--target", type=int, default=0, help="the attacks' target class (0)")
    p.add_argument("--tie-tol", type=float, default=0.005, help="mean-DER tolerance of a tie (0.005)")
    p.add_argument("--max-acc-drop", type=float, default=0.02, help="preferred max mean ACC drop (0.02)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument(
        "--out",
        default="benchmarks/results/baselines_tuned.json",
        help="output JSON (default: the file scripts/heldout_eval.py reads)",
    )
    args = p.parse_args(argv)

    if args.attack is None:
        args.attack = [_attack_from_name(m) for m in args.models]
        missing = [m for m, a in zip(args.models, args.attack) if a is None]
        if missing:
            p.error(f"--attack is required: cannot infer the attack from {', '.join(missing)}")
    elif len(args.attack) == 1:
        args.attack = args.attack * len(args.models)
    elif len(args.attack) != len(args.models):
        p.error(
            f"--attack needs one name or one per model; got {len(args.attack)} for {len(args.models)} models"
        )
    from cbd_fast.evaluation.backdoors import ATTACKS

    bad = [a for a in args.attack if a not in ATTACKS and a != "badencoder"]
    if bad:
        p.error(f"unknown attack(s) {bad}; expected one of {sorted(ATTACKS)}")
    if args.val_start < 0 or args.n_val < 1 or args.val_start + args.n_val > 5000:
        p.error(
            f"the dev split [val_start, val_start + n_val) must lie in the 5,000 validation images; got "
            f"[{args.val_start}, {args.val_start + args.n_val})"
        )
    if not 0 < args.defense_fraction <= 1:
        p.error(f"--defense-fraction must be in (0, 1]; got {args.defense_fraction}")
    if args.n_defense is not None and args.n_defense < 2:
        p.error(f"--n-defense must be >= 2; got {args.n_defense}")
    grid = {m: DEFAULT_GRID[m] for m in args.methods}
    if args.grid_json:
        try:
            given = json.loads(args.grid_json)
        except json.JSONDecodeError as exc:
            p.error(f"--grid-json is not JSON: {exc}")
        if not isinstance(given, dict) or any(
            not isinstance(v, list) or not v or not all(isinstance(s, dict) for s in v)
            for v in given.values()
        ):
            p.error("--grid-json must be {method: [ {keyword: value, ...}, ... ]} with non-empty lists")
        unknown = sorted(set(given) - set(LABELED_BASELINES))
        if unknown:
            p.error(f"--grid-json names unknown method(s) {unknown}")
        grid.update({m: v for m, v in given.items() if m in args.methods})
    args.grid = grid
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from cbd_fast.evaluation.backdoors import trigger_for
    from cbd_fast.evaluation.baselines import LABELED_BASELINES
    from cbd_fast.evaluation.baselines.neuron_pruning import prune_neurons
    from cbd_fast.evaluation.fmnist import load_fashion_mnist
    from cbd_fast.evaluation.metrics import defense_effectiveness_rate, evaluate_backdoor
    from cbd_fast.evaluation.models import load_model
    from cbd_fast.evaluation.protocol import defender_images, split_test_set

    t_start = time.perf_counter()
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    x_def, idx = defender_images(train, args.defense_fraction, seed=args.defense_seed)
    y_def = train.labels[idx]
    if args.n_defense is not None:
        x_def, y_def = x_def[: args.n_defense], y_def[: args.n_defense]
    val = split_test_set(test, "validation").subset(slice(args.val_start, args.val_start + args.n_val))

    models = []
    for path, attack in zip(args.models, args.attack):
        model = load_model(path)
        trigger = trigger_for(attack)
        before = evaluate_backdoor(model, val.images, val.labels, trigger, args.target)
        models.append(
            {"path": str(path), "attack": attack, "model": model, "trigger": trigger, "before": before}
        )
        print(f"{path} ({attack}): ACC {100 * before['acc']:.1f}  ASR {100 * before['asr']:.1f}", flush=True)

    def score(m: dict[str, Any], defended: torch.nn.Module, seconds: float) -> dict[str, float]:
        after = evaluate_backdoor(defended, val.images, val.labels, m["trigger"], args.target)
        b = m["before"]
        return {
            "acc": after["acc"],
            "asr": after["asr"],
            "der": defense_effectiveness_rate(b["acc"], b["asr"], after["acc"], after["asr"]),
            "acc_drop": b["acc"] - after["acc"],
            "seconds": seconds,
        }

    results: dict[str, Any] = {}
    for method in args.methods:
        f = LABELED_BASELINES[method]
        settings = [{"hyper": dict(h), "per_model": []} for h in args.grid[method]]
        for m in models:
            anp_cache: dict[str, dict[str, Any]] = {}
            for s in settings:
                hyper = s["hyper"]
                t0 = time.perf_counter()
                info: dict[str, Any] = {}
                with warnings.catch_warnings():  # "pruned nothing" is recorded below instead
                    warnings.simplefilter("ignore", RuntimeWarning)
                    if method == "anp":  # one mask optimisation per setting without its threshold
                        key = json.dumps({k: v for k, v in sorted(hyper.items()) if k != "threshold"})
                        if key not in anp_cache:
                            f(m["model"], x_def, y_def, seed=args.seed, info=info, **hyper)
                            anp_cache[key] = {"masks": info["masks"], "seconds": time.perf_counter() - t0}
                        t1 = time.perf_counter()
                        defended, pruned = prune_neurons(
                            m["model"], anp_cache[key]["masks"], hyper.get("threshold", 0.2)
                        )
                        info = {"n_pruned": sum(map(len, pruned.values()))}
                        seconds = anp_cache[key]["seconds"] + time.perf_counter() - t1
                    else:
                        defended = f(m["model"], x_def, y_def, seed=args.seed, info=info, **hyper)
                        seconds = time.perf_counter() - t0
                r = score(m, defended, seconds)
                diag = {k: info[k] for k in DIAGNOSTICS[method] if k in info}
                if "pruned" in diag:
                    diag["pruned"] = len(diag["pruned"])
                s["per_model"].append({"path": m["path"], "attack": m["attack"], **r, "info": diag})
                print(
                    f"  {method} {json.dumps(hyper)} on {Path(m['path']).name}: ACC {100 * r['acc']:.1f}  "
                    f"ASR {100 * r['asr']:.1f}  DER {100 * r['der']:.1f}  ({r['seconds']:.0f} s)",
                    flush=True,
                )
        for s in settings:
            rows = s["per_model"]
            s["mean_der"] = sum(r["der"] for r in rows) / len(rows)
            s["mean_acc_drop"] = sum(r["acc_drop"] for r in rows) / len(rows)
            s["mean_asr"] = sum(r["asr"] for r in rows) / len(rows)
        best = choose(settings, tie_tol=args.tie_tol, max_acc_drop=args.max_acc_drop)
        results[method] = {"settings": settings, "chosen": settings[best]["hyper"], "chosen_index": best}
        chosen = settings[best]
        print(
            f"{method}: chosen {json.dumps(chosen['hyper'])} (mean DER {100 * chosen['mean_der']:.1f}, "
            f"ACC drop {100 * chosen['mean_acc_drop']:.1f} points)",
            flush=True,
        )

    out = {
        "rule": (
            f"per method: settings with mean DER >= best - {args.tie_tol} are tied; among them prefer "
            f"mean ACC drop <= {args.max_acc_drop}; then highest mean DER, then smallest ACC drop"
        ),
        "dev_split": {"set": "validation half of test", "start": args.val_start, "n": args.n_val},
        "defender_set": {
            "set": "train",
            "fraction": args.defense_fraction,
            "seed": args.defense_seed,
            "n": len(x_def),
        },
        "seed": args.seed,
        "models": [{"path": m["path"], "attack": m["attack"], "before": m["before"]} for m in models],
        "methods": results,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": args.threads,
        "wall_seconds": time.perf_counter() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
