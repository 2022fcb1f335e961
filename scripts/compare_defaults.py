#!/usr/bin/env python
"""Rerun CBD on the Fashion-MNIST evaluation cells with the CURRENT ``purify`` defaults and put the
result beside the stored cells of ``benchmarks/results/fmnist_eval.json`` (computed with the
defaults of the release that wrote them).

    python scripts/compare_defaults.py --jobs 2                 # 5 attacks x 3 seeds, CBD only
    python scripts/compare_defaults.py --seeds 0                # the shipped seed-0 models only
    python scripts/compare_defaults.py --render                 # print the side-by-side table

Writes ``benchmarks/results/fmnist_eval_current.json`` (cells merged as they finish, so an
interrupted run resumes). Same models, unlabeled draw and 10,000 test images as
``scripts/run_evaluation.py``; the baselines are not rerun (they do not depend on the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT / "benchmarks" / "results" / "fmnist_eval.json"
OUT = ROOT / "benchmarks" / "results" / "fmnist_eval_current.json"
ATTACKS = ("badnets", "blended", "sig", "wanet", "badencoder")


def run_cell(attack: str, seed: int) -> dict:
    """CBD with the current defaults on one stored cell (``run_evaluation.run_cell`` without the
    baselines): no-defense and CBD ACC/ASR, the config, the wall time."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_evaluation import run_cell as evaluation_cell

    cell = evaluation_cell(attack, seed, None, baselines=False)
    return {
        "attack": attack,
        "seed": seed,
        "cbd": cell["results"]["cbd"],
        "no_defense": cell["results"]["no_defense"],
        "config": cell["config"],
        "wall_seconds": cell["wall_seconds"],
    }


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"cells": {}}


def _save(data: dict) -> None:
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, OUT)


def _mean(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = 100 * statistics.mean(vals)
    return f"{m:.1f}" if len(vals) < 2 else f"{m:.1f} +- {100 * statistics.stdev(vals):.1f}"


def render() -> str:
    """Markdown: per attack, CBD ACC drop and ASR with the stored and the current defaults."""
    old, new = _load(STORED)["cells"], _load(OUT)["cells"]
    lines = [
        "| attack | seeds | ACC drop, previous defaults | ACC drop, current "
        "| ASR %, previous | ASR %, current |",
        "|---|---|---|---|---|---|",
    ]
    for a in ATTACKS:
        keys = sorted(k for k in new if k.startswith(a + "/") and k in old)
        if not keys:
            continue
        drop_old = [old[k]["results"]["no_defense"]["acc"] - old[k]["results"]["cbd"]["acc"] for k in keys]
        drop_new = [new[k]["no_defense"]["acc"] - new[k]["cbd"]["acc"] for k in keys]
        asr_old = [old[k]["results"]["cbd"]["asr"] for k in keys]
        asr_new = [new[k]["cbd"]["asr"] for k in keys]
        row = [a, str(len(keys)), _mean(drop_old), _mean(drop_new), _mean(asr_old), _mean(asr_new)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--render", action="store_true", help="print the table and exit")
    args = p.parse_args(argv)
    if args.render:
        print(render())
        return 0
    data = _load(OUT)
    todo = [
        (a, int(s))
        for s in args.seeds.split(",")
        for a in args.attacks.split(",")
        if f"{a}/{s}" not in data["cells"]
    ]
    with ProcessPoolExecutor(max(1, args.jobs)) as ex:
        futs = {ex.submit(run_cell, a, s): (a, s) for a, s in todo}
        for f in as_completed(futs):
            cell = f.result()
            data["cells"][f"{cell['attack']}/{cell['seed']}"] = cell
            _save(data)
            print(json.dumps({k: cell[k] for k in ("attack", "seed", "cbd")}), flush=True)
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
