#!/usr/bin/env python
"""Train and cache the attack zoo's backdoored models (FOR EVALUATION ONLY).

    python scripts/train_zoo.py --attacks all --archs fmnistnet,bn_gap_cnn,resnet8,tiny_vit \\
        --seeds 1,2,3 --jobs 2

``--attacks``: ``all``, ``dev``, ``report`` or comma-separated names (``cbd_fast.evaluation.zoo.ZOO``).
Every (attack, arch, seed) is built with ``zoo.build_record`` on the Fashion-MNIST training set and
stored under ``runs/zoo/{arch}/`` (``runs/`` is git-ignored):

- ``{attack}_seed{seed}.pt``: the model's float32 state_dict;
- ``{attack}_seed{seed}.trigger.pt``: the trigger's state (stateful attacks: adversarial_patch, ban,
  input_aware, ssba, trojannn);
- ``{attack}_seed{seed}.json``: written last: clean ACC and ASR on the 10,000 test images (encoder
  attacks: of a linear probe on the first ``--probe-images`` clean training images), seconds, the
  poisoned count and indices, the settings.

A finished build (its JSON exists) is skipped. ``{attack}_seed{seed}.lock`` (holding the pid) keeps two
processes from training the same model: a build locked by a live process is skipped and reported, a
lock left by a dead process is taken over. Each job runs one thread; ``--jobs`` builds run in parallel.
``--n-train N`` trains on a fixed subset of N images instead (stored under ``runs/zoo-n{N}/``), for
timing estimates. Reload a build with ``cbd_fast.evaluation.zoo.load_build(stem)``.

Exit status: 0 when every requested build is finished, 1 when one failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_ARCHS = "fmnistnet,bn_gap_cnn,resnet8,tiny_vit"
SUBSET_SEED = 2024  # the --n-train subset's generator (the stability matrix's)


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers; got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers >= 0; got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="all", help="all | dev | report | comma-separated names")
    p.add_argument(
        "--archs", default=DEFAULT_ARCHS, help=f"comma-separated architectures (default {DEFAULT_ARCHS})"
    )
    p.add_argument("--seeds", default="1,2,3", type=lambda s: _parse_ints(s, "--seeds"))
    p.add_argument("--jobs", default=1, type=int, help="builds in parallel (one thread each)")
    p.add_argument("--epochs", default=3, type=int)
    p.add_argument("--rate", default=0.1, type=float)
    p.add_argument("--target", default=0, type=int)
    p.add_argument("--n-train", default=None, type=int, help="train on a fixed subset of N images")
    p.add_argument("--probe-images", default=10000, type=int, help="linear-probe images (encoder attacks)")
    p.add_argument("--out", default=None, type=Path, help="default runs/zoo (runs/zoo-n{N} with --n-train)")
    p.add_argument("--dry-run", action="store_true", help="list the builds and their state, train nothing")
    args = p.parse_args(argv)

    from cbd_fast.evaluation.architectures import ARCHITECTURES
    from cbd_fast.evaluation.zoo import select

    try:
        args.attack_list = select(args.attacks)
    except ValueError as exc:
        p.error(f"--attacks: {exc}")
    args.arch_list = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in args.arch_list if a not in ARCHITECTURES]
    if bad or not args.arch_list:
        p.error(
            f"--archs: unknown architecture(s) {bad or [args.archs]}; choose from {sorted(ARCHITECTURES)}"
        )
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1; got {args.jobs}")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1; got {args.epochs}")
    if not 0.0 <= args.rate <= 1.0:
        p.error(f"--rate must be in [0, 1]; got {args.rate}")
    if args.n_train is not None and args.n_train < 100:
        p.error(f"--n-train must be >= 100; got {args.n_train}")
    if args.out is None:
        args.out = ROOT / "runs" / ("zoo" if args.n_train is None else f"zoo-n{args.n_train}")
    return args


# ---------------------------------------------------------------------------- one build (in a worker)


@lru_cache(maxsize=2)
def _data(n_train: int | None) -> tuple[Any, Any]:
    import torch

    from cbd_fast.evaluation.fmnist import load_fashion_mnist

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if n_train is not None and n_train < len(train):
        g = torch.Generator().manual_seed(SUBSET_SEED)
        train = train.subset(torch.randperm(len(train), generator=g)[:n_train])
    return train, test


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(lock: Path) -> int | None:
    """Create ``lock`` with our pid: None once held, else the pid of the live process holding it."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return pid
            if not pid:  # being written right now, or garbage: give the writer a moment
                time.sleep(0.5)
                try:
                    pid = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    return pid
            lock.unlink(missing_ok=True)  # left by a dead process
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return None


def _summary_of(record: dict[str, Any], status: str) -> dict[str, Any]:
    keys = ("attack", "arch", "seed", "split", "kind", "acc", "asr", "poisoned", "seconds", "evaluated_with")
    return {"status": status, **{k: record.get(k) for k in keys}}


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """Build, evaluate and store one (attack, arch, seed) unless it is finished or locked."""
    import torch

    torch.set_num_threads(1)
    from cbd_fast.evaluation.metrics import evaluate_backdoor, linear_probe
    from cbd_fast.evaluation.zoo import build_record, get_attack, save_build, stem_paths

    attack, arch, seed = task["attack"], task["arch"], task["seed"]
    paths = stem_paths(Path(task["out"]) / arch / f"{attack}_seed{seed}")
    base = {"attack": attack, "arch": arch, "seed": seed}
    if paths["meta"].is_file():
        return _summary_of(json.loads(paths["meta"].read_text()), "cached")
    paths["lock"].parent.mkdir(parents=True, exist_ok=True)
    holder = acquire(paths["lock"])
    if holder is not None:
        return {**base, "status": f"locked by pid {holder}"}
    try:
        if paths["meta"].is_file():  # finished by another process between the check and the lock
            return _summary_of(json.loads(paths["meta"].read_text()), "cached")
        train, test = _data(task["n_train"])
        built = build_record(
            attack, arch, train, seed=seed, epochs=task["epochs"], rate=task["rate"], target=task["target"]
        )
        clf, how = built.model, "head"
        if get_attack(attack).kind == "encoder":
            n = min(task["probe_images"], len(train))
            clf, how = (
                linear_probe(built.model.backbone, train.images[:n], train.labels[:n]),
                f"linear_probe({n})",
            )
        res = evaluate_backdoor(clf, test.images, test.labels, built.trigger, target=task["target"])
        extra = {
            "acc": round(res["acc"], 4),
            "asr": round(res["asr"], 4),
            "evaluated_with": how,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        save_build(built, paths["model"].with_suffix(""), extra)
        return _summary_of({**built.info, **extra}, "trained")
    except Exception as exc:  # reported in the summary; the other builds go on
        return {**base, "status": f"failed: {type(exc).__name__}: {exc}"}
    finally:
        paths["lock"].unlink(missing_ok=True)


# ---------------------------------------------------------------------------- driver


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else str(v)


def print_summary(rows: list[dict[str, Any]]) -> None:
    head = ("arch", 11, "<"), ("attack", 18, "<"), ("seed", 4, ">"), ("split", 6, "<"), ("ACC%", 6, ">")
    head += ("ASR%", 6, ">"), ("poisoned", 8, ">"), ("sec", 7, ">")
    print("\n" + " ".join(f"{name:{align}{width}}" for name, width, align in head) + "  status")
    for r in rows:
        print(
            f"{r['arch']:<11} {r['attack']:<18} {r['seed']:>4} {_fmt(r.get('split')):<6} "
            f"{_fmt(r.get('acc'), True):>6} {_fmt(r.get('asr'), True):>6} {_fmt(r.get('poisoned')):>8} "
            f"{_fmt(r.get('seconds')):>7}  {r['status']}"
        )
    counts: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(":")[0].split(" by ")[0]
        counts[key] = counts.get(key, 0) + 1
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def _progress(count: int, total: int, task: dict[str, Any], row: dict[str, Any]) -> None:
    print(
        f"[{count}/{total}] {task['arch']} {task['attack']} seed {task['seed']}: {row['status']}", flush=True
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = [
        {
            "attack": attack,
            "arch": arch,
            "seed": seed,
            "out": str(args.out),
            "epochs": args.epochs,
            "rate": args.rate,
            "target": args.target,
            "n_train": args.n_train,
            "probe_images": args.probe_images,
        }
        for arch in args.arch_list
        for attack in args.attack_list
        for seed in args.seeds
    ]
    print(f"{len(tasks)} builds -> {args.out} ({args.jobs} job(s), 1 thread each)", flush=True)
    if args.dry_run:
        from cbd_fast.evaluation.zoo import stem_paths

        for t in tasks:
            paths = stem_paths(Path(t["out"]) / t["arch"] / f"{t['attack']}_seed{t['seed']}")
            state = (
                "finished" if paths["meta"].is_file() else "locked" if paths["lock"].exists() else "to train"
            )
            print(f"  {t['arch']:<11} {t['attack']:<18} seed {t['seed']}: {state}")
        return 0
    rows: list[dict[str, Any]] = []
    if args.jobs == 1:
        for t in tasks:
            rows.append(run_one(t))
            _progress(len(rows), len(tasks), t, rows[-1])
    else:
        import multiprocessing as mp

        done: dict[int, dict[str, Any]] = {}
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, t): i for i, t in enumerate(tasks)}
            for future in as_completed(futures):
                i, t = futures[future], tasks[futures[future]]
                done[i] = future.result()
                _progress(len(done), len(tasks), t, done[i])
        rows = [done[i] for i in range(len(tasks))]
    print_summary(rows)
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
