#!/usr/bin/env python
"""Regenerate the Fashion-MNIST evaluation: ``benchmarks/results/fmnist_eval.json`` + ``docs/results.md``.

    python scripts/run_evaluation.py --jobs 2            # full table: 5 attacks x 3 seeds x 5 methods
    python scripts/run_evaluation.py --render-only       # rebuild docs/results.md from the JSON
    python scripts/run_evaluation.py --check badnets/0 wanet/0   # recompute two cells, compare exactly

For every attack (badnets, blended, sig, wanet on a supervised backbone with its original head;
badencoder: a self-supervised encoder evaluated with a linear probe) and seed, it loads the backdoored
model (cbd_fast/evaluation/assets or runs/models, trained by scripts/train_backdoor.py when missing),
draws 5% of
the training images as the defender's unlabeled set, and runs: no defense, CBD (``cbd_fast.purify``
with its DEFAULTS), plain fine-tuning (same loss, epsilon 0), supervised fine-tuning (labels),
adversarial unlearning (labels). ACC and ASR on the 10,000 test images. One thread per job.
Finished cells are kept in the JSON and skipped on a rerun unless they were run with other CBD defaults
(``--fresh`` recomputes everything). Each trigger's floor (its ASR on the other attacks' models) is
reported next to the targets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "benchmarks" / "results" / "fmnist_eval.json"
OUT_MD = ROOT / "docs" / "results.md"
ATTACKS = ("badnets", "blended", "sig", "wanet", "badencoder")
METHODS = ("no_defense", "cbd", "plain_finetune", "supervised_finetune", "adversarial_unlearning")
LABELS = {
    "no_defense": "no",
    "cbd": "no",
    "plain_finetune": "no",
    "supervised_finetune": "yes",
    "adversarial_unlearning": "yes",
}


def run_cell(attack: str, seed: int, n_test: int | None, baselines: bool = True) -> dict:
    """One (attack, seed) cell: the demo's no-defense and CBD results, and the four baselines unless
    ``baselines`` is False; the CBD config used and the wall time."""
    import torch

    torch.set_num_threads(1)
    from cbd_fast.app.demo import run_demo

    # A model another process is training right now (scripts/train_backdoor.py with a .lock next to
    # the target file) is waited for instead of being trained twice.
    target = ROOT / "runs" / "models" / f"{attack}_seed{seed}.pt"
    lock = target.with_name(target.name + ".lock")
    deadline = time.time() + 3600
    while lock.exists() and not target.exists() and time.time() < deadline:
        time.sleep(10)
    t0 = time.perf_counter()
    out = run_demo(
        attack,
        seed=seed,
        report_dir=None,
        quiet=True,
        baselines=baselines,
        n_test=n_test,
        cache_dir=ROOT / "runs" / "models",
        diagnostic=False,
        progress=False,
    )
    return {
        "attack": attack,
        "seed": seed,
        "results": out["results"],
        "config": out["config"],
        "adversary_settings": _adversary_settings(out["config"]),
        "wall_seconds": time.perf_counter() - t0,
    }


def trigger_floor(attack: str, seed: int, n_test: int | None) -> dict[str, float]:
    """ASR of ``attack``'s trigger on each OTHER supervised attack's backdoored model (same seed).

    Those models have no backdoor for this trigger, so the lowest value is the share of triggered
    non-target test images a model sends to the target class anyway (class confusions): a floor no
    defense goes below. A high value means another backdoor answers this trigger too (the SIG model
    answers the blend). Uses only cached models (runs/models); ``{}`` when none is there.
    """
    import torch

    from cbd_fast.evaluation.backdoors import SUPERVISED_ATTACKS, trigger_for
    from cbd_fast.evaluation.fmnist import load_fashion_mnist
    from cbd_fast.evaluation.metrics import attack_success_rate
    from cbd_fast.evaluation.models import load_model

    test = load_fashion_mnist("test")
    if n_test is not None:
        ti = torch.randperm(len(test), generator=torch.Generator().manual_seed(123))[:n_test]
        test = test.subset(ti)
    vals = {}
    for other in SUPERVISED_ATTACKS:
        path = ROOT / "runs" / "models" / f"{other}_seed{seed}.pt"
        if other != attack and path.is_file():
            model = load_model(str(path))
            vals[other] = attack_success_rate(model, test.images, test.labels, trigger_for(attack), 0)
    return vals


def _current_config(seed: int) -> dict:
    from cbd_fast import PurifyConfig

    return PurifyConfig(seed=seed, progress=False).validate().to_dict()


def _adversary_settings(config: dict) -> dict:
    """The adversary's effective settings (its OPTIONS defaults updated with ``adversary_options``)."""
    from cbd_fast.core.adversaries import ADVERSARIES

    return ADVERSARIES[config["adversary"]].check_options(config.get("adversary_options"))


def _stale(cell: dict) -> bool:
    """A cached cell run with other CBD defaults (config or adversary settings): it is recomputed."""
    now = _current_config(int(cell["seed"]))
    return cell.get("config") != now or cell.get("adversary_settings") != _adversary_settings(now)


def _load() -> dict:
    if OUT_JSON.is_file():
        return json.loads(OUT_JSON.read_text())
    return {"cells": {}}


def _save(data: dict) -> None:
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT_JSON.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, OUT_JSON)


def _fmt(vals: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not vals:
        return "-"
    m = statistics.mean(vals) * scale
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals) * scale:.{digits}f}"


def render(data: dict) -> str:
    cells = data["cells"]
    lines = [
        "# Fashion-MNIST evaluation of cbd_fast",
        "",
        "Generated by `"
        + data.get("command", "python scripts/run_evaluation.py --jobs 2")
        + "` on "
        + data.get("date", "?")
        + " ("
        + data.get("machine", "?")
        + ").",
        "",
        "Setting: `cbd_fast.evaluation.models.FMNISTNet` (0.1M parameters, 3 epochs of training), "
        "10% poison, all-to-one, "
        "target class 0. The defender gets 5% of the training images (3,000) without labels; CBD is "
        "`cbd_fast.purify` with the defaults of the run that computed the cells (one config for all "
        "attacks; the config of the first cell is listed below, and a cell computed with other defaults "
        "than today's is recomputed on the next run). Supervised attacks are evaluated "
        "with the model's original head on the purified backbone; `badencoder` (a BadEncoder-style "
        "feature-space backdoor planted into a clean encoder, no head) with a linear probe trained on 10,000 "
        "clean labeled images over the frozen backbone. ACC/ASR in % on the test set "
        f"({data.get('n_test') or 10000} images; ASR over non-target images), DER in [0, 1], seconds of "
        "defense wall time, one thread per job, ``--jobs`` jobs on the machine above (other load adds "
        "noise: compare methods within a seed). Mean ± std over the seeds listed.",
        "",
        "| attack | method | labels | seeds | ACC % | ASR % | DER | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for attack in ATTACKS:
        runs = [c for c in cells.values() if c["attack"] == attack]
        if not runs:
            continue
        seeds = ",".join(str(s) for s in sorted(c["seed"] for c in runs))
        for m in METHODS:
            rs = [c["results"][m] for c in runs if m in c["results"]]
            if not rs:
                continue
            lines.append(
                f"| {attack} | {m} | {LABELS[m]} | {seeds} | {_fmt([r['acc'] for r in rs])} | "
                f"{_fmt([r['asr'] for r in rs])} | {_fmt([r['der'] for r in rs], 1.0, 3)} | "
                f"{_fmt([r['seconds'] for r in rs], 1.0, 0)} |"
            )
    lines += ["", "## Targets", ""]
    for attack in ATTACKS:
        runs = [c for c in cells.values() if c["attack"] == attack and "cbd" in c["results"]]
        if not runs:
            continue
        asr = statistics.mean(c["results"]["cbd"]["asr"] for c in runs) * 100
        dacc = (
            statistics.mean(c["results"]["no_defense"]["acc"] - c["results"]["cbd"]["acc"] for c in runs)
            * 100
        )
        sup = (
            statistics.mean(
                c["results"]["supervised_finetune"]["der"]
                for c in runs
                if "supervised_finetune" in c["results"]
            )
            if runs
            else float("nan")
        )
        der = statistics.mean(c["results"]["cbd"]["der"] for c in runs)
        ok = asr <= 5 and dacc <= 2
        per_seed = data.get("floors", {}).get(attack, {}).values()
        fl = [min(d.values()) for d in per_seed if isinstance(d, dict) and d]
        floor = (
            f" (floor {100 * statistics.mean(fl):.1f}%: the trigger's ASR on the least affected model "
            "without its backdoor)"
            if fl
            else ""
        )
        lines.append(
            f"- {attack}: CBD ASR {asr:.1f}%{floor} (target <= 5), ACC drop {dacc:.1f} points (target <= 2), "
            f"DER {der:.3f} vs supervised fine-tuning {sup:.3f}: **{'met' if ok else 'NOT met'}**."
        )
    n_seeds = {a: len([c for c in cells.values() if c["attack"] == a]) for a in ATTACKS}
    if any(v < 3 for v in n_seeds.values()):
        lines += [
            "",
            "**Incomplete:** the table reports the mean of 3 seeds; this run finished "
            + ", ".join(f"{a}: {n}" for a, n in n_seeds.items())
            + " seed(s). Rerun the command above to add the missing cells (finished ones are kept).",
        ]
    cfg = next(iter(cells.values()))["config"] if cells else {}
    keys = (
        "adversary",
        "epsilon",
        "step_size",
        "steps",
        "temperature",
        "epochs",
        "lr",
        "optimizer",
        "clean_term",
        "clean_weight",
        "bn_policy",
        "batch_size",
        "adversary_options",
        "grad_spike_factor",
    )
    lines += ["", "## The CBD defaults used", "", "```"]
    lines += [f"{k} = {cfg.get(k)!r}" for k in keys if k in cfg]
    settings = next(iter(cells.values())).get("adversary_settings") if cells else None
    if settings:
        lines += [f"# the adversary's settings: {settings!r}"]
    lines += ["```", ""]
    abl = ROOT / "docs" / "ablation.md"
    if abl.is_file():
        lines += [abl.read_text()]
    return "\n".join(lines) + "\n"


def check_cells(names: list[str], data: dict, jobs: int) -> int:
    """Recompute the cells ``names`` ("attack/seed") and compare every method's ACC and ASR with the
    stored ones, to the last bit. Prints one line per method; returns 1 on any difference."""
    stored = data["cells"]
    missing = [n for n in names if n not in stored]
    if missing:
        raise SystemExit(f"--check: no stored cell {missing}; stored: {sorted(stored)}")
    todo = [(n.split("/")[0], int(n.split("/")[1])) for n in names]
    n_test = data.get("n_test")
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(todo))) as ex:
            cells = list(ex.map(run_cell, *zip(*todo), [n_test] * len(todo)))
    else:
        cells = [run_cell(a, s, n_test) for a, s in todo]
    bad = 0
    for name, cell in zip(names, cells):
        for method, new in cell["results"].items():
            old = stored[name]["results"].get(method, {})
            same = all(new.get(k) == old.get(k) for k in ("acc", "asr"))
            bad += not same
            print(
                f"{name:14s} {method:24s} ACC {new['acc']:.6f} (stored {old.get('acc', float('nan')):.6f}) "
                f"ASR {new['asr']:.6f} (stored {old.get('asr', float('nan')):.6f}) "
                f"{'identical' if same else 'DIFFERENT'}",
                flush=True,
            )
    print(f"{'all identical' if not bad else f'{bad} differ'}")
    return int(bad > 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--n-test", type=int, default=None, help="test images (default all 10,000)")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--render-only", action="store_true")
    p.add_argument(
        "--check",
        nargs="+",
        metavar="ATTACK/SEED",
        help="recompute these stored cells and compare ACC/ASR bit for bit (writes nothing)",
    )
    args = p.parse_args(argv)
    if args.check:
        return check_cells(args.check, _load(), args.jobs)
    data = {"cells": {}} if args.fresh else _load()
    if not args.render_only:
        todo = [
            (a, int(s))
            for s in args.seeds.split(",")
            for a in args.attacks.split(",")
            if f"{a}/{s}" not in data["cells"] or _stale(data["cells"][f"{a}/{s}"])
        ]
        if todo:  # the header describes the run that computed cells
            data.update(
                command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]),
                date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
                n_test=args.n_test,
            )
        if args.jobs > 1:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(args.jobs) as ex:
                futs = {ex.submit(run_cell, a, s, args.n_test): (a, s) for a, s in todo}
                for f in as_completed(futs):
                    cell = f.result()
                    data["cells"][f"{cell['attack']}/{cell['seed']}"] = cell
                    _save(data)
                    print(json.dumps({k: cell[k] for k in ("attack", "seed")}), flush=True)
        else:
            for a, s in todo:
                cell = run_cell(a, s, args.n_test)
                data["cells"][f"{a}/{s}"] = cell
                _save(data)
                print(json.dumps({"attack": a, "seed": s}), flush=True)
        floors = data.setdefault("floors", {})
        for a in args.attacks.split(","):
            if a != "badencoder":
                floors[a] = {s: trigger_floor(a, int(s), args.n_test) for s in args.seeds.split(",")}
        _save(data)
    OUT_MD.parent.mkdir(parents=True, exist_ok=True)
    OUT_MD.write_text(render(data))
    print(f"wrote {OUT_MD} and {OUT_JSON}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
