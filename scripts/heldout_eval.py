#!/usr/bin/env python
"""The held-out evaluation (``docs/evaluation.md``): every method on the REPORT attacks' test images.

    python scripts/heldout_eval.py --attacks report --archs fmnistnet --seeds 1 --jobs 2
    python scripts/heldout_eval.py --attacks dev --archs fmnistnet --seeds 1 --jobs 2   # dev, for reference
    python scripts/heldout_eval.py --render                                              # table only
    python scripts/heldout_eval.py --seeds 1 --out benchmarks/results/heldout_eval_rebuilt.json   # apart

For every (architecture, attack, seed) cell it loads the backdoored model from the zoo cache
(``runs/zoo/ARCH/ATTACK_seedSEED``, trained by ``scripts/train_zoo.py`` when missing), draws the
defender's 5% (3,000 images) independently of the poisoned indices
(``cbd_fast.evaluation.protocol.defender_images``) and runs:

- label-free: ``no_defense``, ``cbd`` (``cbd_fast.purify`` with the library defaults),
  ``cbd_paper`` (``PurifyConfig.paper()``), ``plain_finetune`` (the defaults without an adversary);
- with the defender's labels (the same 3,000 images, labelled): ``fine_tuning``, ``fine_pruning``,
  ``nad``, ``anp``, ``i_bau`` with the settings chosen on the dev attacks
  (``benchmarks/results/baselines_tuned.json``, written by ``scripts/tune_baselines.py``; paper
  defaults when absent, said in the JSON).

ACC and ASR on the 5,000 TEST images (the validation half is for choices); ASR over non-target
images; DER = (max(0, dACC-drop) ...) as ``cbd_fast.evaluation.metrics.defense_effectiveness_rate``.
The trigger floor of a cell: the attack's test trigger on a CLEAN model of the same architecture and
seed (no backdoor), the share of triggered non-target images sent to the target anyway.
Supervised models are read through their own head; encoder attacks through a linear probe trained on
10,000 clean labelled training images over the frozen backbone. One thread per job; results
accumulate in ``benchmarks/results/heldout_eval.json`` (finished cells are kept; a cell computed with
other CBD defaults is recomputed) and ``docs/heldout_results.md`` is rendered from it.
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
OUT_JSON = ROOT / "benchmarks" / "results" / "heldout_eval.json"
OUT_MD = ROOT / "docs" / "heldout_results.md"
LOCK = ROOT / "runs" / "heldout_eval.lock"  # (runs/ is git-ignored)
ZOO_DIR = ROOT / "runs" / "zoo"
BASELINE_SETTINGS = ROOT / "benchmarks" / "results" / "baselines_tuned.json"
LABEL_FREE = ("no_defense", "cbd", "cbd_paper", "plain_finetune")
LABELED = ("fine_tuning", "fine_pruning", "nad", "anp", "i_bau")
METHODS = LABEL_FREE + LABELED
N_PROBE = 10000


def _cbd_config(seed: int) -> dict:
    """The default PurifyConfig of a report run, with the adversary's resolved settings (so a change
    of the adversary's own defaults also marks the stored CBD results stale)."""
    from cbd_fast import PurifyConfig
    from cbd_fast.core.adversaries.base import make_adversary

    cfg = PurifyConfig(seed=seed, progress=False).validate()
    return cfg.to_dict() | {"adversary_defaults": make_adversary(cfg).options}


def baseline_settings(path: Path = BASELINE_SETTINGS) -> dict:
    """Each label-using baseline's keyword arguments: the setting ``scripts/tune_baselines.py`` chose
    on the dev attacks (its JSON's ``methods[m]["chosen"]``), or ``{}`` (the paper's defaults) for a
    method it did not tune or when there is no tuning file; ``"_source"`` says which."""
    if not path.is_file():
        return {m: {} for m in LABELED} | {"_source": "paper defaults (no dev tuning file)"}
    methods = json.loads(path.read_text()).get("methods")
    if not isinstance(methods, dict) or not all("chosen" in v for v in methods.values()):
        raise SystemExit(f"{path}: expected scripts/tune_baselines.py's output (methods -> chosen)")
    tuned = [m for m in LABELED if m in methods]
    source = f"{path.name}: dev-tuned {', '.join(tuned) or 'none'}; paper defaults for the others"
    return {m: dict(methods[m]["chosen"]) if m in methods else {} for m in LABELED} | {"_source": source}


def same_defaults(stored: dict | None, current: dict) -> bool:
    """Whether CBD results stored with the defaults ``stored`` hold for the defaults ``current``: the
    same settings, where a field added since and left at None (a switch that is off) changes nothing,
    at any depth (the adversary's options are a nested dict)."""
    if not isinstance(stored, dict) or not isinstance(current, dict):
        return False
    if set(stored) - set(current):
        return False
    for k, v in current.items():
        if k not in stored:
            if v is not None:
                return False
        elif isinstance(v, dict) and isinstance(stored[k], dict):
            if not same_defaults(stored[k], v):  # e.g. the adversary's own options
                return False
        elif stored[k] != v:
            return False
    return True


def stale_methods(cell: dict, methods: tuple[str, ...], seed: int, settings: dict) -> list[str]:
    """The ``methods`` a stored ``cell`` lacks or holds with other settings: CBD-dependent results
    computed with other defaults, baselines computed with other hyper-parameters."""
    results = cell["results"]
    other_defaults = not same_defaults(cell.get("cbd_config"), _cbd_config(seed))

    def stale(m: str) -> bool:
        if m not in results:
            return True
        if m in _DEPENDS_ON_DEFAULTS:
            return other_defaults
        return m in LABELED and results[m].get("settings", {}) != settings.get(m, {})

    return [m for m in methods if stale(m)]


def clean_model(arch: str, seed: int, train):  # noqa: ANN001, ANN201
    """A model of ``arch`` trained on the clean training set (cached): the floor's reference."""
    import torch

    from cbd_fast.evaluation.zoo.training import new_model, train_victim

    path = ZOO_DIR / arch / f"clean_seed{seed}.pt"
    model = new_model(arch, seed)
    if path.is_file():
        from cbd_fast.core.safe_load import torch_load_weights

        model.load_state_dict(torch_load_weights(path))
        return model.eval()
    train_victim(arch, model, train, epochs=3, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def load_backdoored(arch: str, attack: str, seed: int, train):  # noqa: ANN001, ANN201
    """``(model, trigger, record)`` from the zoo cache; trained and stored first when missing."""
    from cbd_fast.evaluation.zoo.build import build_record, load_build, save_build

    stem = ZOO_DIR / arch / f"{attack}_seed{seed}"
    try:
        return load_build(stem)
    except FileNotFoundError:
        built = build_record(attack, arch, train, seed=seed)
        save_build(built, stem)
        return load_build(stem)


def run_cell(
    arch: str,
    attack: str,
    seed: int,
    methods: tuple[str, ...] = METHODS,
    stored: dict | None = None,
    requested: tuple[str, ...] = (),
) -> dict:
    """Every method of ``methods`` on one (arch, attack, seed) cell; see the module docstring.

    ``stored``: the cell as stored, whose other results ``methods`` completes. When the zoo model
    is not the one ``stored`` was computed on (:func:`same_model`), none of those results will be
    kept, so every method of ``requested`` is run instead of ``methods`` alone.
    """
    import torch
    from torch import nn

    torch.set_num_threads(1)
    from cbd_fast import Purifier, PurifyConfig
    from cbd_fast.evaluation import baselines as bl
    from cbd_fast.evaluation.fmnist import load_fashion_mnist
    from cbd_fast.evaluation.metrics import defense_effectiveness_rate, evaluate_backdoor, linear_probe
    from cbd_fast.evaluation.protocol import check_purpose, defender_images, split_test_set
    from cbd_fast.evaluation.zoo.registry import get_attack

    spec = get_attack(attack)
    # report and dev attacks alike: report seeds and the test half only
    check_purpose("report", split_of_attack=spec.split, seed=seed, images="test")
    train = load_fashion_mnist("train")
    test = split_test_set(load_fashion_mnist("test"), "test")
    model, trigger, record = load_backdoored(arch, attack, seed, train)
    encoder_kind = spec.kind == "encoder"
    x_def, idx = defender_images(train, 0.05, seed=seed)
    y_def = train.labels[idx]  # ONLY for the label-using baselines
    probe_data = (train.images[:N_PROBE], train.labels[:N_PROBE])

    def classifier(backbone: nn.Module, head: nn.Module | None) -> nn.Module:
        if encoder_kind or head is None:
            return linear_probe(backbone, *probe_data)
        return nn.Sequential(backbone, head).eval()

    def evaluate(backbone: nn.Module, head: nn.Module | None) -> dict:
        return evaluate_backdoor(classifier(backbone, head), test.images, test.labels, trigger)

    results: dict[str, dict] = {}
    before = evaluate(model.backbone, model.head)
    results["no_defense"] = {**before, "seconds": 0.0}
    model_record = {
        k: record.get(k) for k in ("acc", "asr", "seconds", "settings", "n_poisoned") if k in record
    }
    if stored is not None and not same_model(stored, model_record, before):
        methods = tuple(dict.fromkeys((*methods, *requested)))

    def add(name: str, backbone: nn.Module, head: nn.Module | None, secs: float, **extra: object) -> None:
        r = evaluate(backbone, head)
        r["der"] = defense_effectiveness_rate(before["acc"], before["asr"], r["acc"], r["asr"])
        results[name] = {**r, "seconds": secs, **extra}

    from cbd_fast.core.health import HealthError

    def label_free(name: str, config: PurifyConfig, no_adversary: bool = False) -> None:
        """Run ``purify`` for ``name``; a run the health check (or a non-finite loss) stopped is a
        result too, recorded with its reason: the user gets an error, not an encoder."""
        t0 = time.perf_counter()
        # the model's head, for the health check's changed predictions (an encoder attack's head is
        # retrained after purification: there is none to give)
        head = False if encoder_kind else model.head
        try:
            if no_adversary:
                config = config.replace(adversary="none", epsilon=0.0)
            fit = Purifier(config).fit(model.backbone, x_def, head=head)
        except (HealthError, RuntimeError) as exc:
            results[name] = {
                "error": f"{type(exc).__name__}: {str(exc)[:400]}",
                "seconds": time.perf_counter() - t0,
            }
            return
        last = fit.history[-1] if fit.history else {}
        health = {k: round(v, 4) for k, v in last.items() if k.startswith("health_") and isinstance(v, float)}
        add(name, fit.encoder, model.head, time.perf_counter() - t0, health=health)

    if "cbd" in methods:
        label_free("cbd", PurifyConfig(seed=seed, progress=False))
    if "cbd_paper" in methods:
        label_free("cbd_paper", PurifyConfig.paper(seed=seed, progress=False))
    if "plain_finetune" in methods:  # the defaults without an adversary (``baselines.plain_finetune``)
        label_free("plain_finetune", PurifyConfig(seed=seed, progress=False), no_adversary=True)
    settings = baseline_settings()
    # label-using baselines act on a classifier: the model itself, or (encoder attacks) the backbone
    # with a linear probe trained on the defender's labelled images.
    if any(m in methods for m in LABELED):
        if encoder_kind:
            import copy

            from cbd_fast.evaluation.architectures import Classifier

            probe = linear_probe(model.backbone, x_def, y_def)
            victim = Classifier(model.backbone, probe.head.in_features)
            victim.head = copy.deepcopy(probe.head).requires_grad_(True)
        else:
            victim = model
        for name in LABELED:
            if name not in methods:
                continue
            t0 = time.perf_counter()
            try:
                out = bl.LABELED_BASELINES[name](victim, x_def, y_def, seed=seed, **settings.get(name, {}))
                add(
                    name,
                    out.backbone,
                    None if encoder_kind else out.head,
                    time.perf_counter() - t0,
                    settings=settings.get(name, {}),
                )
            except (ValueError, TypeError, RuntimeError) as exc:
                results[name] = {
                    "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                    "seconds": time.perf_counter() - t0,
                    "settings": settings.get(name, {}),
                }
    clean = clean_model(arch, seed, train)
    floor = evaluate_backdoor(classifier(clean.backbone, clean.head), test.images, test.labels, trigger)
    return {
        "arch": arch,
        "attack": attack,
        "split": spec.split,
        "kind": spec.kind,
        "seed": seed,
        "results": results,
        "floor_asr": floor["asr"],
        "cbd_config": _cbd_config(seed),
        "baseline_settings_source": settings["_source"],
        "model_record": model_record,
    }


# ---------------------------------------------------------------------------------------------- storage


def _load() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {"cells": {}}


def _save(data: dict) -> None:
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT_JSON.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, OUT_JSON)


#: methods whose result depends on the library's CBD defaults (recomputed when they change)
_DEPENDS_ON_DEFAULTS = ("cbd", "plain_finetune")


def same_model(old: dict, model_record: dict | None, before: dict | None) -> bool:
    """Whether a stored cell ``old`` was computed on the backdoored model that now has
    ``model_record`` (its zoo record) and ``before`` (its ``no_defense`` ACC / ASR on the test
    images). Another clean ACC or ASR in either is another model: a retrained zoo model that did not
    come out the same, or one rebuilt on another CPU whose record holds no scores. A score only one
    side holds (an older record without it) is not a change."""
    scores = ("acc", "asr")
    old_model, new_model = old.get("model_record") or {}, model_record or {}
    if any(k in old_model and k in new_model and old_model[k] != new_model[k] for k in scores):
        return False
    old_before = old.get("results", {}).get("no_defense")
    if isinstance(old_before, dict) and isinstance(before, dict):
        return all(old_before.get(k) == before.get(k) for k in scores)
    return True


def merge_cell(old: dict | None, new: dict) -> dict:
    """``new`` plus the results of ``old`` for methods ``new`` did not run; results that depend on
    the CBD defaults are dropped when ``old`` was computed with other defaults, and every old result
    when the cell's backdoored model changed (:func:`same_model`)."""
    if old is None:
        return new
    if not same_model(old, new.get("model_record"), new["results"].get("no_defense")):
        return new
    kept = dict(old.get("results", {}))
    if not same_defaults(old.get("cbd_config"), new.get("cbd_config") or {}):
        for m in _DEPENDS_ON_DEFAULTS:
            kept.pop(m, None)
    return {**new, "results": {**kept, **new["results"]}}


def _store_cell(key: str, cell: dict, stamp: dict) -> dict:
    """Merge one finished cell into the JSON on disk under a lock (several runs may write it)."""
    import fcntl

    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _load()
        data.update(stamp)
        data["cells"][key] = merge_cell(data["cells"].get(key), cell)
        _save(data)
    return data


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def summarize(rows: list[dict], method: str) -> dict | None:
    """``method``'s ASR / ACC-drop statistics (in % and points) over the cells ``rows`` that ran it:
    ``n`` (cells that ran it, failures included), ``stopped`` (of those, the runs that stopped with an
    error instead of returning a model), ``mean_asr``, ``max_asr``, ``mean_drop`` (over the finished
    runs), ``met`` (ASR <= 5 and drop <= 2; a stopped run never meets it), ``mean_der``,
    ``mean_seconds``; None when no cell finished it."""
    rs = [
        (c["results"]["no_defense"], c["results"][method])
        for c in rows
        if method in c["results"] and "error" not in c["results"][method]
    ]
    if not rs:
        return None
    asr = [r["asr"] * 100 for _, r in rs]
    drop = [(b["acc"] - r["acc"]) * 100 for b, r in rs]
    return {
        "n": sum(1 for c in rows if method in c["results"]),
        "stopped": sum(1 for c in rows if "error" in c["results"].get(method, {})),
        "mean_asr": statistics.mean(asr),
        "max_asr": max(asr),
        "mean_drop": statistics.mean(drop),
        "met": sum(1 for a, d in zip(asr, drop) if a <= 5 and d <= 2),
        "mean_der": statistics.mean(r["der"] for _, r in rs),
        "mean_seconds": statistics.mean(r["seconds"] for _, r in rs),
    }


#: DER of a run that stopped instead of returning a model: the defender keeps the backdoored model,
#: which is what "no change" scores ((0 - 0 + 1) / 2)
STOPPED_DER = 0.5


def _der(result: dict) -> float:
    """A method's DER in one cell; ``STOPPED_DER`` when it stopped without a model."""
    return STOPPED_DER if "error" in result else result["der"]


def der_by_attack(cells: list[dict]) -> list[dict]:
    """Per attack, CBD's DER against the best label-using baseline's, each a mean over the same seeds:
    those where CBD and a label-using baseline ran (a stopped run counts ``STOPPED_DER``). A baseline
    is compared when it ran on every one of those seeds. Returns one dict per attack with a comparison:
    ``attack``, ``seeds``, ``cbd`` (mean DER), ``best`` (the baseline's name), ``best_der``, ``wins``
    (CBD's mean >= the best baseline's)."""
    out = []
    for attack in sorted({c["attack"] for c in cells}):
        mine = [
            c
            for c in cells
            if c["attack"] == attack and "cbd" in c["results"] and any(m in c["results"] for m in LABELED)
        ]
        seeds = {c["seed"] for c in mine}
        rivals = [m for m in LABELED if mine and all(m in c["results"] for c in mine)]
        if not rivals:
            continue
        means = {m: statistics.mean(_der(c["results"][m]) for c in mine) for m in ("cbd", *rivals)}
        best = max(rivals, key=lambda m: means[m])
        out.append(
            {
                "attack": attack,
                "seeds": sorted(seeds),
                "cbd": means["cbd"],
                "best": best,
                "best_der": means[best],
                "wins": means["cbd"] >= means[best] - 1e-9,
            }
        )
    return out


def _der_summary(cells: list[dict]) -> list[str]:
    """Markdown lines: the per-attack DER comparison of ``der_by_attack`` and its count."""
    rows = der_by_attack(cells)
    if not rows:
        return []
    lines = [
        "| attack | seeds | CBD mean DER | best label-using (mean DER) | CBD at least as good |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {', '.join(map(str, r['seeds']))} | {r['cbd']:.3f} | "
            f"{r['best']} ({r['best_der']:.3f}) | {'yes' if r['wins'] else 'no'} |"
        )
    wins = sum(r["wins"] for r in rows)
    lines += [
        "",
        f"CBD's mean DER >= the best label-using baseline's on {wins} of {len(rows)} attacks (means over "
        f"the seeds where every compared method ran; a stopped run counts DER {STOPPED_DER}).",
    ]
    return lines


def _relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def render(data: dict) -> str:
    cells = data["cells"]
    lines = [
        "# Held-out evaluation",
        "",
        f"Generated by `python scripts/heldout_eval.py` from `{_relative(OUT_JSON)}` "
        f"(last run {data.get('date', '?')}, {data.get('machine', '?')}). Protocol: `docs/evaluation.md`. "
        "Cells: ACC / ASR in % on the 5,000 test images (the validation half was used for choices), "
        "the defender's 3,000 images drawn independently of the poisoned ones. `floor`: the trigger's "
        "ASR on a clean model of the same architecture and seed. A method that stopped (health check, "
        "non-finite loss) or failed shows `stopped`.",
        "",
    ]
    for split in ("report", "dev"):
        rows = sorted(
            (c for c in cells.values() if c["split"] == split),
            key=lambda c: (c["arch"], c["attack"], c["seed"]),
        )
        if not rows:
            continue
        lines += [
            f"## {'Report' if split == 'report' else 'Dev'} attacks"
            + (" (never used for a choice)" if split == "report" else " (tuned on: for reference only)"),
            "",
        ]
        lines += [
            "| arch | attack | seed | floor | " + " | ".join(METHODS) + " |",
            "|" + "---|" * (4 + len(METHODS)),
        ]
        for c in rows:
            cols = []
            for m in METHODS:
                r = c["results"].get(m)
                cols.append(
                    "not run"
                    if r is None
                    else ("stopped" if "error" in r else f"{_pct(r['acc'])} / {_pct(r['asr'])}")
                )
            lines.append(
                f"| {c['arch']} | {c['attack']} | {c['seed']} | {_pct(c['floor_asr'])} | "
                + " | ".join(cols)
                + " |"
            )
        lines.append("")
        # summary per method over the cells of this split
        lines += [
            "| method | labels | mean ASR % | max ASR % | mean ACC drop | cells ASR <= 5 and drop <= 2 "
            "| stopped | mean DER | mean seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in METHODS[1:]:
            st = summarize(rows, m)
            if st is None:
                continue
            lines.append(
                f"| {m} | {'yes' if m in LABELED else 'no'} | {st['mean_asr']:.1f} | {st['max_asr']:.1f} | "
                f"{st['mean_drop']:.1f} | {st['met']} / {st['n']} | {st['stopped']} | {st['mean_der']:.3f} | "
                f"{st['mean_seconds']:.0f} |"
            )
        provenance = []
        for m in LABELED:
            ran = [c["results"][m] for c in rows if m in c["results"]]
            if ran:
                tuned = sum(1 for r in ran if r.get("settings"))
                provenance.append(f"{m} dev-tuned in {tuned} of {len(ran)} cells")
        if provenance:
            lines += ["", "Label-using settings (the rest: the paper's): " + "; ".join(provenance) + "."]
        archs = sorted({c["arch"] for c in rows})
        if len(archs) > 1:
            lines += [
                "",
                "Per architecture (`cbd`, and the best label-using baseline by mean DER); `weak`: cells "
                "whose backdoor fires on under 50% of the triggered images before any defense:",
                "",
                "| arch | cells | weak | cbd mean ASR % | cbd max ASR % | cbd mean ACC drop | cbd cells met "
                "| best label-using (mean ASR %, drop) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for a in archs:
                sub = [c for c in rows if c["arch"] == a]
                st = summarize(sub, "cbd")
                if st is None:
                    continue
                weak = sum(1 for c in sub if c["results"]["no_defense"]["asr"] < 0.5)
                lab = [(m, summarize(sub, m)) for m in LABELED]
                lab = [(m, x) for m, x in lab if x is not None]
                best = max(lab, key=lambda mx: mx[1]["mean_der"]) if lab else None
                best_txt = (
                    f"{best[0]} ({best[1]['mean_asr']:.1f}, {best[1]['mean_drop']:.1f}; {best[1]['n']} cells)"
                    if best
                    else "not run"
                )
                lines.append(
                    f"| {a} | {st['n']} | {weak} | {st['mean_asr']:.1f} | {st['max_asr']:.1f} | "
                    f"{st['mean_drop']:.1f} | {st['met']} | {best_txt} |"
                )
        if split == "report":
            best = []
            for c in rows:
                lab = [_der(c["results"][m]) for m in LABELED if m in c["results"]]
                if lab and "cbd" in c["results"]:
                    best.append(_der(c["results"]["cbd"]) >= max(lab) - 1e-9)
            if best:
                lines += [
                    "",
                    f"CBD's DER >= the best label-using baseline's on {sum(best)} of {len(best)} cells "
                    f"(a stopped run counts DER {STOPPED_DER}).",
                ]
            for a in archs:
                per_attack = _der_summary([c for c in rows if c["arch"] == a])
                if per_attack:
                    lines += ["", f"Per attack (`{a}`):", "", *per_attack]
        lines.append("")
    cfg = next(iter(cells.values()))["cbd_config"] if cells else {}
    lines += (
        ["## CBD defaults used", "", "```"]
        + [
            f"{k} = {v!r}"
            for k, v in cfg.items()
            if k
            in (
                "adversary",
                "adversary_options",
                "adversary_defaults",
                "epsilon",
                "step_size",
                "steps",
                "adv_fraction",
                "attack_anchors",
                "epochs",
                "lr",
                "optimizer",
                "clean_term",
                "clean_weight",
                "bn_policy",
                "batch_size",
            )
        ]
        + ["```", ""]
    )
    return "\n".join(lines)


def readme_table(data: dict, arch: str = "fmnistnet", split: str = "report") -> str:
    """The README's table: per attack, ACC / ASR (%) of each method averaged over the seeds it
    finished on ("(k)": on k of the attack's seeds only, the others not run or stopped with an error;
    "stopped": stopped on every seed); bold where a CBD column's mean misses ASR <= 5 or ACC drop <= 2."""
    cells = [c for c in data["cells"].values() if c["arch"] == arch and c["split"] == split]
    attacks = sorted({c["attack"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    cols = [m for m in METHODS if any(m in c["results"] for c in cells)]
    head = "| attack | " + " | ".join(cols) + " | floor |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for a in attacks:
        mine = [c for c in cells if c["attack"] == a]
        row = [a]
        before = statistics.mean(c["results"]["no_defense"]["acc"] for c in mine)
        for m in cols:
            rs = [c["results"][m] for c in mine if m in c["results"] and "error" not in c["results"][m]]
            if not rs:
                row.append("stopped" if any(m in c["results"] for c in mine) else "-")
                continue
            acc, asr = statistics.mean(r["acc"] for r in rs), statistics.mean(r["asr"] for r in rs)
            text = f"{100 * acc:.1f} / {100 * asr:.1f}"
            miss = m in ("cbd", "cbd_paper") and (asr > 0.05 or before - acc > 0.02)
            n = f" ({len(rs)})" if len(rs) != len(mine) else ""
            row.append((f"**{text}**" if miss else text) + n)
        row.append(f"{100 * statistics.mean(c['floor_asr'] for c in mine):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    der = _der_summary(cells)
    return (
        "\n".join(lines)
        + f"\n\nseeds: {', '.join(map(str, seeds))}\n"
        + ("\n" + "\n".join(der) + "\n" if der else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="report", help="report | dev | all | a,b")
    p.add_argument("--archs", default="fmnistnet")
    p.add_argument("--seeds", default="1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--render", action="store_true")
    p.add_argument("--readme", action="store_true", help="print the README's table (means over seeds)")
    p.add_argument("--fresh", action="store_true", help="recompute finished cells too")
    p.add_argument(
        "--out",
        default=None,
        metavar="JSON",
        help="keep the cells in this JSON instead (its table goes beside it, .md): e.g. a rerun on "
        "zoo models rebuilt on another machine, which must not mix with the stored cells",
    )
    args = p.parse_args(argv)
    if args.out is not None:
        global OUT_JSON, OUT_MD, LOCK
        OUT_JSON = Path(args.out).resolve()
        if OUT_JSON.suffix != ".json":
            raise SystemExit(f"--out {args.out!r}: expected a .json path")
        OUT_MD, LOCK = OUT_JSON.with_suffix(".md"), LOCK.with_name(OUT_JSON.stem + ".lock")
    data = _load()
    if args.readme:
        print(readme_table(data))
        return 0
    if not args.render:
        from cbd_fast.evaluation.protocol import REPORT_SEEDS
        from cbd_fast.evaluation.zoo.registry import select

        seeds = [int(s) for s in args.seeds.split(",")]
        bad = [s for s in seeds if s not in REPORT_SEEDS]
        if bad:
            raise SystemExit(f"--seeds {bad}: reported numbers use the report seeds {REPORT_SEEDS} only")
        methods = tuple(m for m in args.methods.split(","))
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; choose from {METHODS}")
        settings = baseline_settings()
        todo = []
        for arch in args.archs.split(","):
            for attack in select(args.attacks):
                for s in seeds:
                    key = f"{arch}/{attack}/{s}"
                    cell = data["cells"].get(key)
                    fresh = args.fresh or cell is None
                    redo = methods if fresh else stale_methods(cell, methods, s, settings)
                    if redo:
                        todo.append((arch, attack, s, tuple(redo), cell))
        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
        stamp = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine}
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max(1, args.jobs)) as ex:
            futs = {
                ex.submit(run_cell, a, k, s, redo, cell, methods): (a, k, s) for a, k, s, redo, cell in todo
            }
            for f in as_completed(futs):
                a, k, s = futs[f]
                try:
                    cell = f.result()
                except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the others
                    print(f"{a}/{k}/{s}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                data = _store_cell(f"{a}/{k}/{s}", cell, stamp)
                r = cell["results"]
                print(
                    f"{a}/{k}/{s}: "
                    + "  ".join(
                        f"{m} {_pct(r[m].get('acc'))}/{_pct(r[m].get('asr'))}" for m in METHODS if m in r
                    )
                    + f"  floor {_pct(cell['floor_asr'])}",
                    flush=True,
                )
    OUT_MD.parent.mkdir(parents=True, exist_ok=True)
    OUT_MD.write_text(render(data))
    print(f"wrote {OUT_MD}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
