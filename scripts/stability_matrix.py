#!/usr/bin/env python
"""Stability matrix: does ``cbd_fast.purify`` keep backbones built the ordinary way working?

    python scripts/stability_matrix.py --train-only --archs bn_gap_cnn,resnet8 --jobs 2
    python scripts/stability_matrix.py --tag defaults --archs bn_gap_cnn,resnet8,fmnistnet --jobs 2
    python scripts/stability_matrix.py --tag lr3e-4 --set lr=3e-4 --set nonfinite=skip
    python scripts/stability_matrix.py --tag defaults --render

For every (architecture, feature dim, attack, seed) cell: a classifier from
``cbd_fast.evaluation.architectures`` is trained with the ordinary user's recipe (Adam lr 1e-3,
3 epochs, batches of 128) on Fashion-MNIST with 10% of its training images poisoned all-to-one
(target 0) by the attack's trigger, and cached under ``runs/stability/models/`` (a rerun loads it).
Then ``cbd_fast.Purifier`` (the object behind ``cbd_fast.purify``) runs with the PurifyConfig
defaults, ``--set`` overrides and ``seed`` = the cell's seed, on ``--n-unlabeled`` clean training
images drawn with their own generator (independent of the poisoned indices). Exceptions are caught
and recorded. ACC and ASR (``cbd_fast.evaluation.metrics``) before and after use the ORIGINAL head
on the purified backbone. A cell is flagged ``collapse`` when the after-ACC is below 20% or one
class takes more than 90% of the test predictions.

Cells are written to ``runs/stability/<tag>.json`` (``--out``) as each finishes; a rerun skips the
cells already there with the same settings, so an interrupted run resumes (``--fresh`` recomputes).
One thread per process; ``--jobs`` processes. The ``cbd_fast`` package must be importable (installed,
or the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "stability"
MODELS = RUNS / "models"
DEFAULT_ARCHS = ("bn_gap_cnn", "resnet8", "fmnistnet", "groupnorm_cnn", "mlp", "tiny_vit")
DEFAULT_ATTACKS = ("badnets", "blended")
POISON_RATE = 0.1
TARGET = 0
TRAIN_EPOCHS = 3
TRAIN_LR = 1e-3
COLLAPSE_ACC = 0.2  # after-ACC below this: collapsed
COLLAPSE_TOP_SHARE = 0.9  # one class above this share of the test predictions: collapsed
UNLABELED_SEED_OFFSET = 7919  # the unlabeled draw's generator: seed + this (never the poisoning seed)
TRAIN_SUBSET_SEED = 2024  # the --n-train subset's generator (the same subset for every cell)
TEST_SUBSET_SEED = 123  # the --n-test subset's generator


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: a backdoored model and the purification settings it is tested with.

    ``overrides`` is a JSON string of the PurifyConfig overrides (hashable); ``n_test`` None = all
    10,000 test images.
    """

    arch: str
    feature_dim: int
    attack: str
    seed: int
    n_train: int
    n_test: int | None
    n_unlabeled: int
    unlabeled: str
    overrides: str

    @property
    def model_key(self) -> str:
        """The cached model's file stem: ``<arch>_d<D>_<attack>_seed<s>_n<n_train>``."""
        return f"{self.arch}_d{self.feature_dim}_{self.attack}_seed{self.seed}_n{self.n_train}"

    @property
    def key(self) -> str:
        """The cell's key in the result file (the settings beyond it are checked on resume)."""
        return f"{self.arch}/d{self.feature_dim}/{self.attack}/seed{self.seed}/n{self.n_train}"


# ---------------------------------------------------------------------------- argument parsing


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when it parses (numbers, true/false/null, lists, dicts), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=3e-4", "optimizer=adam"]`` -> ``{"lr": 0.0003, "optimizer": "adam"}``, checked by PurifyConfig.

    Raises:
        SystemExit: an item without ``=``, or a field/value PurifyConfig refuses (the message names it).
    """
    from cbd_fast import PurifyConfig

    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set takes FIELD=VALUE; got {item!r}")
        out[name.strip()] = parse_value(value)
    try:
        PurifyConfig().replace(**out)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--set {out}: {exc}") from None
    return out


def overrides_text(overrides: dict[str, Any]) -> str:
    """The canonical JSON text of PurifyConfig overrides (sorted keys): a cell's ``overrides`` field."""
    return json.dumps(overrides, sort_keys=True)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--archs", type=_csv, default=list(DEFAULT_ARCHS), help="comma-separated architectures")
    p.add_argument("--attacks", type=_csv, default=list(DEFAULT_ATTACKS), help="badnets, blended, sig, wanet")
    p.add_argument("--seeds", type=_ints, default=[0], help="comma-separated model seeds (default 0)")
    p.add_argument("--feature-dims", type=_ints, default=[128], help="comma-separated D (default 128)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="PurifyConfig override")
    p.add_argument("--tag", default="defaults", help="name of the result set (default 'defaults')")
    p.add_argument("--n-train", type=int, default=60000, help="training images for the backdoor training")
    p.add_argument("--n-test", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--n-unlabeled", type=int, default=3000, help="unlabeled images given to purify")
    p.add_argument(
        "--unlabeled",
        choices=("clean", "poisoned"),
        default="clean",
        help="the unlabeled images: clean training images, or the poisoned training set's versions",
    )
    p.add_argument("--jobs", type=int, default=1, help="processes (one thread each)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default runs/stability/<tag>.json)")
    p.add_argument("--render", action="store_true", help="print the Markdown table of --out and exit")
    p.add_argument("--train-only", action="store_true", help="train and cache the models, purify nothing")
    p.add_argument("--fresh", action="store_true", help="recompute cells already in --out")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse unknown architectures/attacks and out-of-range sizes, naming the value."""
    from cbd_fast.evaluation.architectures import ARCHITECTURES
    from cbd_fast.evaluation.backdoors import ATTACKS

    for arch in args.archs:
        if arch not in ARCHITECTURES:
            raise SystemExit(f"--archs: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    for attack in args.attacks:
        if attack not in ATTACKS:
            raise SystemExit(f"--attacks: unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    for name, value, top in (
        ("--n-train", args.n_train, 60000),
        ("--n-test", args.n_test or 1, 10000),
        ("--n-unlabeled", args.n_unlabeled, 60000),
        ("--jobs", args.jobs, 64),
    ):
        if not 1 <= value <= top:
            raise SystemExit(f"{name} must be in [1, {top}]; got {value}")
    if args.n_unlabeled > args.n_train:
        raise SystemExit(f"--n-unlabeled ({args.n_unlabeled}) must be <= --n-train ({args.n_train})")
    for d in args.feature_dims:
        if d < 1:
            raise SystemExit(f"--feature-dims must be positive; got {d}")
    for s in args.seeds:
        if s < 0:
            raise SystemExit(f"--seeds must be >= 0; got {s}")


# ---------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _datasets() -> tuple[Any, Any]:
    from cbd_fast.evaluation.fmnist import load_fashion_mnist

    return load_fashion_mnist("train"), load_fashion_mnist("test")


def train_subset(n_train: int) -> Any:
    """The first ``n_train`` images of a fixed permutation of the 60,000 (all, in order, for 60,000)."""
    import torch

    train, _ = _datasets()
    if n_train >= len(train):
        return train
    g = torch.Generator().manual_seed(TRAIN_SUBSET_SEED)
    return train.subset(torch.randperm(len(train), generator=g)[:n_train])


def poisoned_set(cell: Cell) -> tuple[Any, Any]:
    """``(poisoned ImageSet, [P] int64 poisoned indices)`` of the cell's training subset."""
    from cbd_fast.evaluation.backdoors import make_trigger, poison_dataset

    data = train_subset(cell.n_train)
    return poison_dataset(data, make_trigger(cell.attack), rate=POISON_RATE, target=TARGET, seed=cell.seed)


def unlabeled_images(cell: Cell) -> tuple[Any, dict[str, Any]]:
    """The defender's [M, 1, 28, 28] float32 images, drawn with a generator of their own.

    Returns:
        ``(images, info)``; ``info`` says how many of the drawn indices were poisoned in training.
    """
    import torch

    poisoned, poison_idx = poisoned_set(cell)
    clean = train_subset(cell.n_train)
    g = torch.Generator().manual_seed(UNLABELED_SEED_OFFSET + cell.seed)
    idx = torch.randperm(len(clean), generator=g)[: cell.n_unlabeled]
    source = clean if cell.unlabeled == "clean" else poisoned
    overlap = int(torch.isin(idx, poison_idx).sum())
    return source.images[idx].clone(), {
        "unlabeled_source": cell.unlabeled,
        "unlabeled_poisoned_index": overlap,
    }


def evaluation_set(n_test: int | None) -> Any:
    """All 10,000 test images, or a fixed random subset of ``n_test``."""
    import torch

    _, test = _datasets()
    if n_test is None or n_test >= len(test):
        return test
    g = torch.Generator().manual_seed(TEST_SUBSET_SEED)
    return test.subset(torch.randperm(len(test), generator=g)[:n_test])


# ---------------------------------------------------------------------------- models


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(lock: Path, target: Path, wait_s: float = 3600.0) -> bool:
    """Create ``lock`` holding our pid: True once held, False when ``target`` appeared meanwhile.

    Waits while a live process holds the lock; takes over a lock whose process is gone.
    """
    deadline = time.time() + wait_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and not _pid_alive(pid):
                lock.unlink(missing_ok=True)
                continue
            if time.time() > deadline:
                raise TimeoutError(f"lock {lock.name} held by pid {pid} for over {wait_s:.0f} s") from None
            time.sleep(5)
            if target.exists():
                return False
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True


def _save(obj: Any, path: Path, writer: Callable[[Any, Path], None]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    writer(obj, tmp)
    os.replace(tmp, path)


def load_or_train(cell: Cell, log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """The cell's backdoored classifier (eval mode) and its training record, trained now when not cached.

    The record: ``train_seconds``, ``train_images``, ``epochs``, ``lr``, ``poisoned`` (count), ``cached``.
    """
    import torch

    from cbd_fast.evaluation.architectures import build, train_adam

    MODELS.mkdir(parents=True, exist_ok=True)
    path, meta_path = MODELS / f"{cell.model_key}.pt", MODELS / f"{cell.model_key}.json"
    lock = MODELS / f"{cell.model_key}.lock"
    torch.manual_seed(cell.seed)
    model = build(cell.arch, cell.feature_dim)
    if not path.exists() and _acquire(lock, path):
        try:
            if not path.exists():  # trained by another process between the check and the lock
                poisoned, idx = poisoned_set(cell)
                log(f"[{cell.model_key}] training on {len(poisoned)} images ({len(idx)} poisoned)")
                t0 = time.perf_counter()
                train_adam(model, poisoned, epochs=TRAIN_EPOCHS, lr=TRAIN_LR, seed=cell.seed, log=log)
                meta = {
                    "train_seconds": time.perf_counter() - t0,
                    "train_images": len(poisoned),
                    "poisoned": len(idx),
                    "epochs": TRAIN_EPOCHS,
                    "lr": TRAIN_LR,
                    "optimizer": "adam",
                    "torch": torch.__version__,
                }
                _save(model.state_dict(), path, lambda o, p: torch.save(o, p))
                _save(meta, meta_path, lambda o, p: p.write_text(json.dumps(o, indent=1)))
                return model.eval(), {**meta, "cached": False}
        finally:
            lock.unlink(missing_ok=True)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return model.eval(), {**meta, "cached": True}


# ---------------------------------------------------------------------------- one cell


def jsonable(value: Any) -> Any:
    """``value`` with tensors as numbers/lists, non-finite floats as strings, unknown objects as repr."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def health_keys(history: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every history key starting with ``health``: ``{key: [value per epoch (None when absent)]}``."""
    keys = sorted({k for entry in history for k in entry if str(k).startswith("health")})
    return {k: jsonable([entry.get(k) for entry in history]) for k in keys}


def prediction_stats(model: Any, test: Any, trigger: Any) -> dict[str, float]:
    """ACC, ASR (fractions) and the largest share of test images given to one class."""
    import torch

    from cbd_fast.evaluation.metrics import evaluate_backdoor, predict

    out = evaluate_backdoor(model, test.images, test.labels, trigger, TARGET)
    counts = torch.bincount(predict(model, test.images), minlength=10)
    out["top_share"] = float(counts.max()) / float(counts.sum())
    out["top_class"] = int(counts.argmax())
    return out


def feature_stats(backbone: Any, images: Any) -> dict[str, float]:
    """Scale of the [M, D] features of ``images`` (eval mode, no gradient): what a loss term in
    feature units sees. Keys: ``norm_mean``/``norm_max`` (L2 norm per image), ``std_mean`` (per-dim
    std, averaged), ``abs_max``, ``dead_share`` (dims that are zero on every image), ``finite``.
    """
    import torch

    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        z = torch.cat([backbone(images[i : i + 500]).flatten(1) for i in range(0, len(images), 500)])
    backbone.train(was)
    norms = z.norm(dim=1)
    return {
        "norm_mean": float(norms.mean()),
        "norm_max": float(norms.max()),
        "std_mean": float(z.std(0).mean()),
        "abs_max": float(z.abs().max()),
        "dead_share": float((z.abs().amax(0) == 0).float().mean()),
        "finite": bool(torch.isfinite(z).all()),
    }


def core_fingerprint() -> str:
    """12 hex digits of SHA-256 over the imported ``cbd_fast/core`` sources (which core version ran)."""
    import cbd_fast

    core = Path(cbd_fast.__file__).parent / "core"
    h = hashlib.sha256()
    for path in sorted(core.rglob("*.py")):
        h.update(str(path.relative_to(core)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def run_cell(cell: Cell, train_only: bool = False) -> dict[str, Any]:
    """Train (or load) the cell's model, purify its backbone, evaluate; never raises for a purify error."""
    import torch

    torch.set_num_threads(1)
    import cbd_fast
    from cbd_fast.evaluation.backdoors import make_trigger

    t_cell = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{cell.model_key}] {line}" if not line.startswith("[") else line, flush=True)

    model, train_meta = load_or_train(cell, log)
    out: dict[str, Any] = {**asdict(cell), "overrides": json.loads(cell.overrides), "train": train_meta}
    if train_only:
        return out
    test, trigger = evaluation_set(cell.n_test), make_trigger(cell.attack)
    before = prediction_stats(model, test, trigger)
    x_unl, unl_info = unlabeled_images(cell)
    config = cbd_fast.PurifyConfig(**{"seed": cell.seed, "progress": False, **out["overrides"]}).validate()
    before["features"] = feature_stats(model.backbone, x_unl[:1000])
    out.update(unl_info, before=before, config=jsonable(config.to_dict()), core=core_fingerprint())
    t0 = time.perf_counter()
    try:
        # the model's head: the health check measures the predictions it changes
        result = cbd_fast.Purifier(config).fit(model.backbone, x_unl, head=model.head)
    except Exception as exc:  # recorded, not raised: a stopped run is a result of the matrix
        out.update(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
        out["nonfinite"] = "non-finite" in str(exc) or "NaN" in str(exc)
        out["health_stop"] = "health" in type(exc).__name__.lower()
        out["collapse"] = None
        out["cell_seconds"] = time.perf_counter() - t_cell
        log(f"stopped after {out['seconds']:.0f} s: {out['error'][:200]}")
        return out
    out["seconds"] = time.perf_counter() - t0
    history = [jsonable(entry) for entry in result.history]
    purified = torch.nn.Sequential(result.encoder, model.head).eval()
    after = prediction_stats(purified, test, trigger)
    after["features"] = feature_stats(result.encoder, x_unl[:1000])
    finite = all(bool(torch.isfinite(p).all()) for p in result.encoder.parameters())
    out.update(
        error=None,
        nonfinite=not finite,
        after=after,
        finite_weights=finite,
        collapse=after["acc"] < COLLAPSE_ACC or after["top_share"] > COLLAPSE_TOP_SHARE,
        clipped_batches=sum(float(e.get("clipped_batches", 0) or 0) for e in result.history),
        skipped_batches=sum(float(e.get("skipped_batches", 0) or 0) for e in result.history),
        health=health_keys(result.history),
        history=history,
        cell_seconds=time.perf_counter() - t_cell,
    )
    log(
        f"ACC {100 * before['acc']:.1f} -> {100 * after['acc']:.1f}, ASR {100 * before['asr']:.1f} -> "
        f"{100 * after['asr']:.1f}, collapse {out['collapse']}, {out['seconds']:.0f} s"
    )
    return out


# ---------------------------------------------------------------------------- the result file


def load_results(path: Path) -> dict[str, Any]:
    """``{"tag", "cells": {key: cell}}`` from ``path`` (an empty set when missing)."""
    if not path.exists():
        return {"cells": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        raise SystemExit(f"{path} is not a stability result file (no 'cells' mapping)")
    return data


def merge_cell(path: Path, tag: str, cell: dict[str, Any]) -> None:
    """Re-read ``path``, put ``cell`` under its key, write it back atomically."""
    data = load_results(path)
    data["tag"] = tag
    data["cells"][Cell(**{**_cell_fields(cell), "overrides": overrides_text(cell["overrides"])}).key] = cell
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(data, path, lambda o, p: p.write_text(json.dumps(o, indent=1, sort_keys=True)))


def _cell_fields(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: cell[k] for k in Cell.__dataclass_fields__}


def is_done(existing: dict[str, Any] | None, cell: Cell) -> bool:
    """True when ``existing`` was computed with exactly ``cell``'s settings (and purified)."""
    if existing is None or "before" not in existing:
        return False
    return _cell_fields({**existing, "overrides": overrides_text(existing["overrides"])}) == asdict(cell)


# ---------------------------------------------------------------------------- the table


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * sum(values) / len(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} (n={len(values)})"


def _where(error: str) -> str:
    """``'epoch 1/4, batch 18/24'`` out of a non-finite stop message, else its first 40 characters."""
    import re

    m = re.search(r"epoch (\d+(?:/\d+)?),? batch (\d+(?:/\d+)?)", error)
    return f"epoch {m.group(1)}, batch {m.group(2)}" if m else error[:40]


def render(data: dict[str, Any]) -> str:
    """The Markdown table: one row per (arch, D, attack), means over seeds, counts of flags."""
    from cbd_fast.evaluation.architectures import ARCHITECTURES

    order = {name: i for i, name in enumerate(ARCHITECTURES)}
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for cell in data["cells"].values():
        if "before" in cell:
            groups.setdefault((cell["arch"], cell["feature_dim"], cell["attack"]), []).append(cell)
    rows = [
        "| arch | D | attack | seeds | ACC before | ACC after | ASR before | ASR after | non-finite "
        "| collapse | clipped | skipped | purify s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (arch, dim, attack), cells in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        done = [c for c in cells if c.get("after")]
        nonfinite = [c for c in cells if c.get("nonfinite")]
        nf = "; ".join(_where(c.get("error") or "non-finite weights") for c in nonfinite) or "no"
        other = [c["error"] for c in cells if c.get("error") and not c.get("nonfinite")]
        if other:
            nf += f" (other error: {_where(other[0])})"
        collapsed = sum(bool(c.get("collapse")) for c in done)
        rows.append(
            f"| {arch} | {dim} | {attack} | {','.join(str(c['seed']) for c in cells)} "
            f"| {_pct([c['before']['acc'] for c in cells])} | {_pct([c['after']['acc'] for c in done])} "
            f"| {_pct([c['before']['asr'] for c in cells])} | {_pct([c['after']['asr'] for c in done])} "
            f"| {nf} | {f'{collapsed}/{len(done)}' if done else '-'} "
            f"| {_sum(done, 'clipped_batches')} | {_sum(done, 'skipped_batches')} "
            f"| {sum(c.get('seconds', 0) for c in cells) / len(cells):.0f} |"
        )
    return "\n".join(rows)


def _sum(cells: list[dict[str, Any]], key: str) -> str:
    return "-" if not cells else f"{sum(c.get(key, 0) for c in cells):g}"


# ---------------------------------------------------------------------------- main


def plan(args: argparse.Namespace, overrides: dict[str, Any]) -> list[Cell]:
    """Every requested cell, architectures outermost (cheap ones are not held back by others)."""
    text = overrides_text(overrides)
    return [
        Cell(arch, d, attack, seed, args.n_train, args.n_test, args.n_unlabeled, args.unlabeled, text)
        for arch in args.archs
        for d in args.feature_dims
        for attack in args.attacks
        for seed in args.seeds
    ]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(cells: list[Cell], jobs: int, train_only: bool, done: Callable[[dict[str, Any]], None]) -> None:
    """Run ``cells`` (``jobs`` processes, or in-process for 1), calling ``done(result)`` as each ends."""
    if jobs == 1:
        for cell in cells:
            try:
                result = run_cell(cell, train_only)
            except Exception as exc:  # a training or evaluation failure: report it, go on
                print(f"[{cell.model_key}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                continue
            done(result)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(run_cell, cell, train_only): cell for cell in cells}
        for fut in as_completed(futures):
            try:
                done(fut.result())
            except Exception as exc:  # a training or evaluation failure: report it, go on
                print(f"[{futures[fut].model_key}] FAILED: {type(exc).__name__}: {exc}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or RUNS / f"{args.tag}.json"
    if args.render:
        print(render(load_results(out)))
        return 0
    check_args(args)
    overrides = parse_overrides(args.set)
    cells = plan(args, overrides)
    if not args.train_only and not args.fresh:
        existing = load_results(out)["cells"]
        skipped = [c for c in cells if is_done(existing.get(c.key), c)]
        if skipped:
            print(f"{len(skipped)} cell(s) already in {out.name}; skipped (--fresh recomputes them)")
        cells = [c for c in cells if c not in skipped]
    print(f"{len(cells)} cell(s) to run with {args.jobs} job(s); overrides {overrides or 'none'}", flush=True)

    def done(result: dict[str, Any]) -> None:
        if args.train_only:
            t = result["train"]
            state = "cached" if t["cached"] else f"trained in {t.get('train_seconds', 0):.0f} s"
            print(f"[{Cell(**_cell_fields({**result, 'overrides': '{}'})).model_key}] {state}", flush=True)
        else:
            merge_cell(out, args.tag, result)

    t0 = time.perf_counter()
    run_all(cells, args.jobs, args.train_only, done)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.train_only and out.exists():
        print(render(load_results(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
