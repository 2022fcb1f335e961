"""End-to-end CBD step benchmarks: cbd_fast's loop vs the naive and strong plain-PyTorch loops.

One pytest-benchmark group per case (encoder, batch size, K); in each group the loops of
``reference_loops.LOOP_NAMES`` are timed side by side in the same run, one batch step per round
(device synchronised at the end of each step), on the same random images and the same starting
weights. The group's summary gives each loop's median time per batch as a multiple of the encoder
floor and the speedups of cbd_fast over naive and strong.

Before anything is timed, an agreement check runs the loops of the case from identical weights, data
and random starts for a few steps and compares their loss curves and weight updates with the naive
loop's (``TOLERANCES``). A loop that fails this end-to-end comparison gets a split check: its
fine-tune is run on naive's adversarial images (same tolerances), and its own adversarial images are
compared with naive's (share of differing pixels, eps-ball, attack loss): the same algorithm whose
float rounding flips a few PGD signs (channels_last convolutions) passes it, another epsilon, step
size, K, loss or fine-tune does not. A loop agrees end to end or by the split check (recorded as
"agreement": "end_to_end" / "split", with the numbers of both in its message; ``test_agreement``
prints them). A loop that disagrees is NOT timed: its test fails and prints the disagreement, and
the summary shows "DISAGREE" instead of a speedup.

Run (CPU defaults: the Fashion-MNIST CNN at bs 256, K 5, and ResNet-18 32 px at bs 8, K 2, 2 rounds)::

    pytest benchmarks/bench_loop.py --benchmark-json=benchmarks/results/loop_cpu.json

Environment:
    CBD_BENCH_CASES   "encoder:batch:K[:rounds][,...]" (default by device, see ``default_cases``)
    CBD_BENCH_LOOPS   comma-separated loop names (default by device)
    CBD_BENCH_ROUNDS  timed rounds per loop (default 5 CPU, 10 CUDA)
    CBD_BENCH_QUICK   1: a tiny smoke run (bs 32, K 2, 2 rounds) for CI
    CBD_BENCH_OUT     directory for loop_summary.json / loop_summary.md (also printed)
    CBD_BENCH_DEVICE  "cpu" or "cuda" (default: cuda when available)
    CBD_BENCH_THREADS torch.set_num_threads(N) for the run (default: torch's choice)
    CBD_BENCH_TIMER   "wall" (default) or "process" (CPU time of the process; for a shared CPU)
    CBD_BENCH_INTERLEAVE  1 (default on CPU): also time all loops round-robin (test_interleaved);
                      the summary then quotes those medians
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from models import ENCODERS, build_encoder  # noqa: E402
from reference_loops import (  # noqa: E402
    CLEAN_TERMS_SUPPORTED,
    LOOP_NAMES,
    NO_REFERENCE,
    TOLERANCES,
    check_agreement,
    make_loop,
)

DEVICE = torch.device(os.environ.get("CBD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("CBD_BENCH_QUICK", "") not in ("", "0")


@dataclass(frozen=True)
class Case:
    """One benchmark group: an encoder at a batch size and a number of PGD steps (+ timed rounds)."""

    encoder: str
    batch: int
    steps: int
    rounds: int | None = None

    @property
    def id(self) -> str:
        return f"{self.encoder}-bs{self.batch}-K{self.steps}"


def default_cases(device: torch.device) -> list[Case]:
    """The benchmark cases: CPU small CNN bs 256 K 5 (+ ResNet-18 32 px, small: at bs 8 K 2 one step
    is ~12 F of 8.9 GFLOP, a few seconds of one core); CUDA ResNet-50 224 px bs 256 K 5 and ViT-B/16
    bs 128 K 5."""
    if QUICK:
        return [Case("fmnist_cnn", 32, 2)]
    if device.type == "cuda":
        return [Case("resnet50", 256, 5), Case("vit_b16", 128, 5)]
    return [Case("fmnist_cnn", 256, 5), Case("resnet18", 8, 2, rounds=2)]


def default_loops(device: torch.device) -> list[str]:
    """CPU: floor, naive, strong, cbd_fast, the clean-forward-reuse prototype and the channels_last
    variants (the layout is worth ~1.5x for the small CNN on the CPU, see NOTES.md). CUDA: all but
    the CPU-only ones."""
    if device.type == "cuda":
        return [n for n in LOOP_NAMES if not n.endswith("+cl")]
    return [
        "floor",
        "naive",
        "strong",
        "cbd_fast",
        "strong+reuse",
        "floor+cl",
        "strong+cl",
        "cbd_fast+cl",
        "cbd_fast+guard",
        "cbd_fast@default",
    ]


def _parse_cases(text: str) -> list[Case]:
    cases = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ENCODERS:
            raise ValueError(
                f"CBD_BENCH_CASES items must be encoder:batch:K[:rounds] with encoder in {sorted(ENCODERS)}; "
                f"got {item!r}"
            )
        cases.append(Case(parts[0], int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) > 3 else None))
    return cases


CASES = (
    _parse_cases(os.environ["CBD_BENCH_CASES"])
    if os.environ.get("CBD_BENCH_CASES")
    else default_cases(DEVICE)
)
LOOPS = (
    [n.strip() for n in os.environ["CBD_BENCH_LOOPS"].split(",") if n.strip()]
    if os.environ.get("CBD_BENCH_LOOPS")
    else default_loops(DEVICE)
)
for _n in LOOPS:
    if _n not in LOOP_NAMES:
        raise ValueError(f"CBD_BENCH_LOOPS names must be in {sorted(LOOP_NAMES)}; got {_n!r}")
ROUNDS = int(os.environ.get("CBD_BENCH_ROUNDS") or (2 if QUICK else (10 if DEVICE.type == "cuda" else 5)))
#: "wall" (perf_counter, device synchronised) or "process" (process CPU time: robust on a CPU shared
#: with other jobs; use with CBD_BENCH_THREADS=1). Used by test_interleaved.
TIMER = os.environ.get("CBD_BENCH_TIMER", "wall")
if TIMER not in ("wall", "process"):
    raise ValueError(f"CBD_BENCH_TIMER must be 'wall' or 'process'; got {TIMER!r}")
#: time all loops of a case round-robin too (default on the CPU, where other jobs come and go).
INTERLEAVE = os.environ.get("CBD_BENCH_INTERLEAVE", "1" if DEVICE.type == "cpu" else "0") not in ("", "0")

if DEVICE.type == "cuda":
    torch.backends.cudnn.benchmark = True  # the same for every loop
if os.environ.get("CBD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CBD_BENCH_THREADS"]))

# ----------------------------------------------------------------------------------------------------
# shared state of the run
# ----------------------------------------------------------------------------------------------------
_ENCODERS: dict[Case, torch.nn.Module] = {}
_BATCHES: dict[Case, torch.Tensor] = {}
_AGREEMENT: dict[Case, dict[str, Any]] = {}
_TIMES: dict[str, dict[str, float]] = {}
_UNAVAILABLE: dict[str, dict[str, str]] = {}
_TIMER = ["time.perf_counter"]
_ITIMES: dict[str, dict[str, float]] = {}  # interleaved medians, preferred by the summary


def bench_config(**overrides: Any) -> Any:
    """The ``PurifyConfig`` every loop follows: the defaults, except ``adversary="pgd"`` (the paper's
    per-sample contrastive PGD: the plain-PyTorch loops implement CBD, not the default trigger
    search), every image attacked against the model's own anchors (``adv_fraction=1.0``,
    ``attack_anchors="current"``: the full CBD batch step these loops implement; the cheaper
    defaults are timed end to end by ``bench_time_to_purify.py``), ``grad_spike_factor=None`` (the
    reference loops have no spike guard; ``cbd_fast+guard`` times it) and, should the default clean
    term be one the reference loops lack, ``"anchor"``. The config used is recorded in the summary.
    """
    from cbd_fast import PurifyConfig

    base = PurifyConfig()
    kw: dict[str, Any] = {
        "adversary": "pgd",
        "progress": False,
        "grad_spike_factor": None,
        "adv_fraction": 1.0,
        "attack_anchors": "current",
        # the reference loops resolve "auto" as on for CUDA only; the "+cl" loops time channels-last
        "channels_last": "auto" if DEVICE.type == "cuda" else False,
    }
    if base.clean_term not in CLEAN_TERMS_SUPPORTED:
        kw["clean_term"] = "anchor"
    kw.update(overrides)
    return base.replace(**kw)


def _config(case: Case) -> Any:
    return bench_config(steps=case.steps, batch_size=case.batch, device=str(DEVICE))


def _encoder(case: Case) -> torch.nn.Module:
    if case not in _ENCODERS:
        _ENCODERS.clear()  # one encoder alive at a time (ResNet-50 / ViT weights on the GPU)
        _ENCODERS[case] = build_encoder(case.encoder, seed=0)
    return _ENCODERS[case]


def _batch(case: Case, index: int = 0) -> torch.Tensor:
    """Random images in [0, 1], reproducible from (case, index): never zeros, which can hide unwritten
    outputs and time faster than real data."""
    if index == 0 and case in _BATCHES:
        return _BATCHES[case]
    g = torch.Generator().manual_seed(1234 + index)
    x = torch.rand((case.batch, *ENCODERS[case.encoder].input_shape), generator=g).to(DEVICE)
    if index == 0:
        _BATCHES[case] = x
    return x


def _agreement(case: Case) -> dict[str, Any]:
    if case not in _AGREEMENT:
        names = [n for n in LOOPS if not n.startswith("floor") and n not in NO_REFERENCE]
        if "naive" not in names:
            names = ["naive", *names]
        cfg, enc = _config(case), _encoder(case)
        if DEVICE.type != "cuda":  # the timed configuration is float32: one tight check
            batches = [_batch(case, i) for i in range(3)]
            _AGREEMENT[case] = check_agreement(enc, batches, cfg, names, DEVICE)
        else:
            # 1. semantics, tight: every loop in true float32 (TF32 off), on a 32-image slice;
            # 2. the timed bf16 configuration, loose (bf16 noise is as large as a subtle semantic
            #    difference, see reference_loops.TOLERANCES), on a 64-image slice.
            batches = [_batch(case, i) for i in range(2)]
            with _true_float32():
                exact = check_agreement(
                    enc, [b[:32] for b in batches], cfg.replace(amp_dtype="float32"), names, DEVICE
                )
            timed = check_agreement(enc, [b[:64] for b in batches], cfg, names, DEVICE)
            _AGREEMENT[case] = _merge_agreement(exact, timed)
    return _AGREEMENT[case]


class _true_float32:
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls inside the block."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def _merge_agreement(exact: dict[str, Any], timed: dict[str, Any]) -> dict[str, Any]:
    """One record per loop: ok only when both the float32 and the timed-precision checks pass."""
    loops = {}
    for name, a in exact["loops"].items():
        b = timed["loops"].get(name, {"ok": False, "unavailable": True, "message": "not run"})
        modes = (a.get("agreement"), b.get("agreement"))
        loops[name] = {
            "ok": bool(a["ok"] and b["ok"]),
            "agreement": (
                None
                if None in modes
                else (modes[0] if modes[0] == modes[1] else f"float32 {modes[0]}, timed {modes[1]}")
            ),
            "unavailable": bool(a.get("unavailable") or b.get("unavailable")),
            "message": f"[float32, TF32 off] {a['message']} | [timed precision] {b['message']}",
            "float32": a,
            "timed": b,
        }
    return {"reference": "naive", "steps": exact["steps"], "loops": loops}


# ----------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_agreement(case: Case) -> None:
    """The loops give matching loss curves and weight updates, end to end or by the split check
    (attack and fine-tune apart, see reference_loops.check_agreement); prints each loop's numbers."""
    report = _agreement(case)
    for name, r in report["loops"].items():
        if name != "naive":
            print(f"\n[{case.id}] {name}: agreement {r.get('agreement')}: {r['message']}")
    bad = {n: r for n, r in report["loops"].items() if not r["ok"] and not r.get("unavailable")}
    assert not bad, "loops disagree with naive:\n" + "\n".join(r["message"] for r in bad.values())
    missing = [r["message"] for r in report["loops"].values() if r.get("unavailable")]
    if missing:
        pytest.skip("agree; unavailable here: " + "; ".join(missing))


def test_agreement_detects_a_difference() -> None:
    """The check is not vacuous: a loop run with another K, step size, clean weight or lr is
    flagged, and the split check (attack and fine-tune apart) refuses it too, on the right part: an
    attack difference fails the attack check, a fine-tune difference the fine-tune check."""
    cfg = bench_config(steps=2, batch_size=16, device="cpu")
    enc = build_encoder("fmnist_cnn", seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 1, 28, 28, generator=g) for _ in range(2)]
    attack = {"strong": cfg.replace(steps=1), "strong+cl": cfg.replace(step_size=cfg.step_size * 1.5)}
    finetune = {"cbd_fast": cfg.replace(clean_weight=0.5), "cbd_fast+cl": cfg.replace(lr=cfg.lr * 1.1)}
    wrong = {**attack, **finetune}
    report = check_agreement(enc, batches, cfg, ["naive", *wrong], "cpu", configs=wrong)
    for name in wrong:
        rec = report["loops"][name]
        assert not rec["ok"] and rec["agreement"] is None, rec["message"]
        assert "finetune" in rec["split"] and not rec["split"]["ok"], rec["message"]
    for name in attack:  # the fine-tune is the same: only the attack check refuses
        split = report["loops"][name]["split"]
        assert split["finetune"]["ok"] and not split["attack"]["ok"], report["loops"][name]["message"]
        assert split["attack"]["pixel_share"] > 0.2
    for name in finetune:
        assert not report["loops"][name]["split"]["finetune"]["ok"], report["loops"][name]["message"]
    same = check_agreement(enc, batches, cfg, ["naive", "strong", "strong+cl"], "cpu", split="always")
    for name in ("strong", "strong+cl"):
        rec = same["loops"][name]
        assert rec["ok"] and rec["agreement"] in ("end_to_end", "split"), rec["message"]
        share = rec["split"]["attack"]["pixel_share"]
        assert rec["split"]["ok"] and share <= TOLERANCES["float32"]["xadv_share"], rec["message"]


def test_summary_refuses_speedup_on_disagreement() -> None:
    """A disagreeing loop gets "DISAGREE: ..." instead of a speedup; agreeing loops get ratios."""
    times = {"g-bs8-K1": {"floor": 1.0, "naive": 4.0, "strong": 2.0, "cbd_fast": 1.6}}
    agree = {
        "g-bs8-K1": {
            "loops": {
                "naive": {"ok": True, "message": ""},
                "strong": {"ok": True, "message": ""},
                "cbd_fast": {"ok": False, "message": "cbd_fast vs naive: loss rel diff 3e-01"},
            }
        }
    }
    s = summarize(times, agree)["groups"]["g-bs8-K1"]
    assert s["speedups"]["strong vs naive"] == pytest.approx(2.0)
    assert str(s["speedups"]["cbd_fast vs naive"]).startswith("DISAGREE")
    assert s["loops"]["cbd_fast"]["x_floor"] == pytest.approx(1.6)
    assert "DISAGREE" in summary_markdown(summarize(times, agree))


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loop_step(benchmark: Any, request: pytest.FixtureRequest, case: Case, loop: str) -> None:
    """Time one CBD batch step of ``loop`` on ``case`` (median over rounds)."""
    _TIMER[0] = str(request.config.getoption("benchmark_timer", None) or "time.perf_counter")
    benchmark.group = case.id
    benchmark.extra_info.update(
        {
            "loop": loop,
            "encoder": case.encoder,
            "batch": case.batch,
            "steps": case.steps,
            "device": str(DEVICE),
        }
    )
    if not loop.startswith("floor") and loop not in NO_REFERENCE:
        report = _agreement(case)["loops"].get(loop)
        if report is None or report.get("unavailable"):
            reason = report["message"] if report else "not checked"
            _UNAVAILABLE.setdefault(case.id, {})[loop] = reason
            pytest.skip(f"{loop} unavailable: {reason}")
        benchmark.extra_info["agreement"] = report
        if not report["ok"]:
            _UNAVAILABLE.setdefault(case.id, {})[loop] = "DISAGREE: " + report["message"]
            pytest.fail(f"refusing to time {loop}: it disagrees with naive: {report['message']}")
    runner = make_loop(loop, _config(case), DEVICE).prepare(_encoder(case))
    x = _batch(case)
    warmup = 3 if "compile" in loop or "graph" in loop else 1
    rounds = ROUNDS if os.environ.get("CBD_BENCH_ROUNDS") or case.rounds is None else case.rounds
    benchmark.pedantic(runner.run, args=(x,), rounds=rounds, iterations=1, warmup_rounds=warmup)
    _TIMES.setdefault(case.id, {})[loop] = benchmark.stats.stats.median
    _write_summary()  # after every loop: a stage killed by a timeout keeps its numbers
    del runner
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.skipif(not INTERLEAVE, reason="CBD_BENCH_INTERLEAVE=0")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_interleaved(benchmark: Any, case: Case) -> None:
    """All agreeing loops of ``case`` timed round-robin, one step each per round, with one clock:
    a drift in the machine's load hits every loop alike. These medians are the ones to quote."""
    benchmark.group = case.id + "-interleaved"
    report = _agreement(case)["loops"]
    names = [
        n for n in LOOPS if n.startswith("floor") or n in NO_REFERENCE or (n in report and report[n]["ok"])
    ]
    refused = {
        n: report[n]["message"]
        for n in LOOPS
        if n in report and not report[n]["ok"] and not report[n].get("unavailable")
    }
    cfg, enc, x = _config(case), _encoder(case), _batch(case)
    runners = {n: make_loop(n, cfg, DEVICE).prepare(enc) for n in names}
    clock = time.process_time if TIMER == "process" else time.perf_counter
    for name, r in runners.items():
        for _ in range(3 if "compile" in name or "graph" in name else 1):
            r.run(x)
    per: dict[str, list[float]] = {n: [] for n in runners}

    def one_round() -> None:
        for n, r in runners.items():
            t0 = clock()
            r.run(x)
            per[n].append(clock() - t0)

    rounds = ROUNDS if os.environ.get("CBD_BENCH_ROUNDS") or case.rounds is None else case.rounds
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    med = {n: statistics.median(v) for n, v in per.items()}
    benchmark.extra_info.update(
        {
            "medians_s": med,
            "rounds_s": per,
            "timer": TIMER,
            "refused": refused,
            "threads": torch.get_num_threads(),
        }
    )
    _ITIMES[case.id] = med
    _TIMER[0] = "interleaved, " + ("time.process_time" if TIMER == "process" else "time.perf_counter")
    for n, why in refused.items():
        _UNAVAILABLE.setdefault(case.id, {})[n] = "DISAGREE: " + why
    _write_summary()


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Any:
    """After the module: print (and with CBD_BENCH_OUT write) the ratios table."""
    yield
    text = _write_summary()
    if text is None:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n" + text)
    else:
        print("\n" + text)


def _write_summary() -> str | None:
    """Summarise what was timed so far; write it to CBD_BENCH_OUT when set. Returns the markdown."""
    if not _TIMES and not _ITIMES:
        return None
    times = {**_TIMES, **_ITIMES}  # interleaved medians replace the per-loop ones of their case
    summary = summarize(times, {c.id: _AGREEMENT.get(c) for c in CASES}, _UNAVAILABLE)
    text = summary_markdown(summary)
    out = os.environ.get("CBD_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "loop_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        Path(out, "loop_summary.md").write_text(text)
    return text


# ----------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What ran the benchmark: host, torch, threads, GPU name, date."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(DEVICE),
        "timer": _TIMER[0],
        "load_average": [round(v, 1) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if DEVICE.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(DEVICE)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(
    times: dict[str, dict[str, float]],
    agreement: dict[str, dict[str, Any] | None],
    unavailable: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Ratios per group: each loop over the floor, and cbd_fast's speedups over naive and strong.

    Args:
        times: {group id: {loop: median seconds per batch}} measured in one run.
        agreement: {group id: ``check_agreement`` report or None}.
        unavailable: {group id: {loop: reason}} loops skipped or refused.

    Returns:
        a JSON-able dict; a speedup whose loops disagree (or were not checked) is replaced by the
        string "DISAGREE: ..." / "unchecked".
    """
    groups: dict[str, Any] = {}
    for gid, t in times.items():
        rep = agreement.get(gid) or {"loops": {}}

        def ok(name: str, rep: dict[str, Any] = rep) -> str | None:
            if name.startswith("floor"):
                return None
            if name in NO_REFERENCE:
                return "no reference loop: timed only"
            r = rep["loops"].get(name)
            if r is None:
                return "unchecked"
            return None if r["ok"] else "DISAGREE: " + r["message"]

        floor = t.get("floor")
        floor_cl = t.get("floor+cl")
        rows = {}
        for name, sec in t.items():
            rows[name] = {
                "median_s": sec,
                "images_per_s": None,
                "x_floor": (sec / floor) if floor else None,
                "x_floor_cl": (sec / floor_cl) if floor_cl else None,
            }
        speedups: dict[str, Any] = {}
        for fast in [n for n in t if n.startswith(("cbd_fast", "strong"))]:
            for base in ("naive", "strong", "cbd_fast"):
                if base not in t or base == fast or (base == "cbd_fast" and not fast.startswith("cbd_fast")):
                    continue
                problem = ok(fast) or ok(base)
                speedups[f"{fast} vs {base}"] = problem if problem else t[base] / t[fast]
            option = fast[len("cbd_fast") :] if fast.startswith("cbd_fast") else ""
            if option and "strong" + option in t:  # the same option on both sides, e.g. +cl vs +cl
                twin = "strong" + option
                problem = ok(fast) or ok(twin)
                speedups[f"{fast} vs {twin}"] = problem if problem else t[twin] / t[fast]
        agree = {}
        for name, r in rep["loops"].items():
            parts = [r.get("float32"), r.get("timed")] if "float32" in r else [r]
            agree[name] = {
                "ok": r["ok"],
                "agreement": r.get("agreement"),
                "checks": [
                    {
                        **{
                            k: p.get(k)
                            for k in ("precision", "agreement", "loss_rdiff", "update_rdiff", "tolerance")
                        },
                        "split": _split_summary(p.get("split")),
                    }
                    for p in parts
                    if p
                ],
            }
        groups[gid] = {
            "loops": rows,
            "speedups": speedups,
            "unavailable": (unavailable or {}).get(gid, {}),
            "agreement": agree,
        }
        for row in rows.values():
            bs = _batch_of(gid)
            row["images_per_s"] = bs / row["median_s"] if bs else None
    config = None
    try:
        config = bench_config().to_dict()
        config.pop("device", None)
    except Exception as e:  # noqa: BLE001 - the summary must not fail on a config problem
        config = f"unavailable: {e}"
    return {"machine": machine_info(), "config": config, "tolerances": TOLERANCES, "groups": groups}


def _split_summary(split: dict[str, Any] | None) -> dict[str, Any] | None:
    """The split check's headline numbers (fine-tune update difference, attack pixel share, largest
    pixel difference in step sizes, attack loss difference), or its error, or None when not run."""
    if not split:
        return None
    if "error" in split:
        return {"ok": False, "error": split["error"]}
    ft, at = split["finetune"], split["attack"]
    return {
        "ok": split["ok"],
        "finetune_update_rdiff": min(ft["update_rdiff"], ft["weighted_update_rdiff"]),
        "finetune_loss_rdiff": ft["loss_rdiff"],
        "attack_pixel_share": at["pixel_share"],
        "attack_max_diff_steps": at["max_diff_steps"],
        "attack_loss_rdiff": at["attack_loss_rdiff"],
    }


def _agreement_cell(a: dict[str, Any]) -> str:
    """The markdown table's agreement column: ok (end to end | split) / FAIL and the numbers."""
    parts = []
    for c in a["checks"]:
        if c.get("loss_rdiff") is None:
            continue
        text = f"{c['precision']}: {c['loss_rdiff']:.1e} / {c['update_rdiff']:.1e}"
        sp = c.get("split")
        if sp and "error" not in sp:
            text += (
                f" (split: fine-tune {sp['finetune_update_rdiff']:.1e}, x_adv "
                f"{100 * sp['attack_pixel_share']:.2f}% px differ, attack loss {sp['attack_loss_rdiff']:.1e})"
            )
        parts.append(text)
    mode = {"end_to_end": "end to end", None: None}.get(a.get("agreement"), a.get("agreement"))
    head = ("ok" + (f" ({mode})" if mode else "")) if a["ok"] else "FAIL"
    return head + " " + "; ".join(parts)


def _batch_of(gid: str) -> int | None:
    for part in gid.split("-"):
        if part.startswith("bs") and part[2:].isdigit():
            return int(part[2:])
    return None


def summary_markdown(summary: dict[str, Any]) -> str:
    """A short markdown table of ``summarize``'s output."""
    m = summary["machine"]
    lines = [
        f"CBD step benchmark, {m['date']}, {m.get('gpu') or m['cpu']} ({m['device']}), "
        f"torch {m['torch']}, {m['threads']} threads, timer {m['timer']}, load {m['load_average']}",
        "",
    ]
    c = summary.get("config")
    if isinstance(c, dict):
        lines += [
            f"config: adversary {c['adversary']}, eps {c['epsilon']:.4f}, alpha {c['step_size']:.4f}, "
            f"tau {c['temperature']}, clean term {c['clean_term']} x {c['clean_weight']}, {c['optimizer']} "
            f"lr {c['lr']}, bn_policy {c['bn_policy']}, amp {c['amp_dtype']}, channels_last "
            f"{c['channels_last']} (K and batch per case)",
            "",
        ]
    for gid, g in summary["groups"].items():
        lines += [
            f"### {gid}",
            "",
            "| loop | ms / batch | images/s | x floor | x floor+cl "
            "| vs naive: agreement, loss / update rel diff |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, r in g["loops"].items():
            xf = f"{r['x_floor']:.2f}" if r["x_floor"] else "-"
            xfc = f"{r['x_floor_cl']:.2f}" if r.get("x_floor_cl") else "-"
            a = g.get("agreement", {}).get(name)
            agree = "-" if a is None else _agreement_cell(a)
            lines.append(
                f"| {name} | {1e3 * r['median_s']:.1f} | {r['images_per_s']:.0f} | {xf} | {xfc} | {agree} |"
            )
        for name, why in g["unavailable"].items():
            lines.append(f"| {name} | n/a: {why[:100]} | | | | |")
        lines.append("")
        for k, v in g["speedups"].items():
            lines.append(f"- {k}: " + (f"{v:.2f}x" if isinstance(v, float) else str(v)))
        lines.append("")
    return "\n".join(lines)
