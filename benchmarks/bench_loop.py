"""End-to-end CBD step benchmarks: cbd_fast's loop vs the naive and strong plain-PyTorch loops.

One pytest-benchmark group per case (encoder, batch size, K); in each group the loops of
``reference_loops.LOOP_NAMES`` are timed side by side in the same run, one batch step per round
(device synchronised at the end of each step), on the same random images and the same starting
weights. The group's summary gives each loop's median time per batch as a multiple of the encoder
floor and the speedups of cbd_fast over naive and strong.

Before anything is timed, an agreement check runs the loops of the case from identical weights, data
and random starts for a few steps and compares their loss curves and weight updates with the naive
loop's (``TOLERANCES``). A loop that disagrees is NOT timed: its test fails and prints the
disagreement, and the summary shows "DISAGREE" instead of a speedup.

Run (CPU defaults: the Fashion-MNIST CNN at bs 256, K 5, and ResNet-18 32 px at bs 16, K 5, 3 rounds)::

    pytest benchmarks/bench_loop.py --benchmark-json=benchmarks/results/loop_cpu.json

Environment:
    CBD_BENCH_CASES   "encoder:batch:K[:rounds][,...]" (default by device, see ``default_cases``)
    CBD_BENCH_LOOPS   comma-separated loop names (default by device)
    CBD_BENCH_ROUNDS  timed rounds per loop (default 5 CPU, 10 CUDA)
    CBD_BENCH_QUICK   1: a tiny smoke run (bs 32, K 2, 2 rounds) for CI
    CBD_BENCH_OUT     directory for loop_summary.json / loop_summary.md (also printed)
    CBD_BENCH_DEVICE  "cpu" or "cuda" (default: cuda when available)
    CBD_BENCH_THREADS torch.set_num_threads(N) for the run (default: torch's choice)
"""

from __future__ import annotations

import json
import os
import platform
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
from reference_loops import LOOP_NAMES, TOLERANCES, check_agreement, make_loop  # noqa: E402

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
    """The cases of issue 7: CPU small CNN bs 256 K 5 (+ ResNet-18 32 px, small: one step is ~18 F of
    17.8 GFLOP at bs 16, several seconds on 2 cores); CUDA ResNet-50 224 px bs 256 K 5 and ViT-B/16
    bs 128 K 5."""
    if QUICK:
        return [Case("fmnist_cnn", 32, 2)]
    if device.type == "cuda":
        return [Case("resnet50", 256, 5), Case("vit_b16", 128, 5)]
    return [Case("fmnist_cnn", 256, 5), Case("resnet18", 16, 5, rounds=3)]


def default_loops(device: torch.device) -> list[str]:
    """CPU: floor, naive, strong, cbd_fast. CUDA: those plus each GPU option alone."""
    if device.type == "cuda":
        return list(LOOP_NAMES)
    return ["floor", "naive", "strong", "cbd_fast"]


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


def _config(case: Case) -> Any:
    from cbd_fast import PurifyConfig

    return PurifyConfig(
        steps=case.steps, batch_size=case.batch, device=str(DEVICE), progress=False
    ).validate()


def _encoder(case: Case) -> torch.nn.Module:
    if case not in _ENCODERS:
        _ENCODERS.clear()  # one encoder alive at a time (ResNet-50 / ViT weights on the GPU)
        _ENCODERS[case] = build_encoder(case.encoder, seed=0)
    return _ENCODERS[case]


def _batch(case: Case, index: int = 0) -> torch.Tensor:
    """Random images in [0, 1] (never zeros: METHOD.md), reproducible from (case, index)."""
    if index == 0 and case in _BATCHES:
        return _BATCHES[case]
    g = torch.Generator().manual_seed(1234 + index)
    x = torch.rand((case.batch, *ENCODERS[case.encoder].input_shape), generator=g).to(DEVICE)
    if index == 0:
        _BATCHES[case] = x
    return x


def _agreement(case: Case) -> dict[str, Any]:
    if case not in _AGREEMENT:
        names = [n for n in LOOPS if n != "floor"]
        if "naive" not in names:
            names = ["naive", *names]
        n_steps = 2 if DEVICE.type == "cuda" else 3
        batches = [_batch(case, i) for i in range(n_steps)]
        _AGREEMENT[case] = check_agreement(_encoder(case), batches, _config(case), names, DEVICE)
    return _AGREEMENT[case]


# ----------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_agreement(case: Case) -> None:
    """The loops give matching loss curves and weight updates (see reference_loops.TOLERANCES)."""
    report = _agreement(case)
    bad = {n: r for n, r in report["loops"].items() if not r["ok"]}
    assert not bad, "loops disagree with naive:\n" + "\n".join(r["message"] for r in bad.values())


def test_agreement_detects_a_difference() -> None:
    """The check is not vacuous: a loop run with another K, clean weight or BN mode is flagged."""
    from cbd_fast import PurifyConfig

    cfg = PurifyConfig(steps=2, batch_size=16, device="cpu", progress=False).validate()
    enc = build_encoder("fmnist_cnn", seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 1, 28, 28, generator=g) for _ in range(2)]
    wrong = {"strong": cfg.replace(steps=1), "cbd_fast": cfg.replace(clean_weight=0.5)}
    report = check_agreement(enc, batches, cfg, ["naive", "strong", "cbd_fast"], "cpu", configs=wrong)
    for name in wrong:
        assert not report["loops"][name]["ok"], report["loops"][name]["message"]
    same = check_agreement(enc, batches, cfg, ["naive", "strong"], "cpu")
    assert same["loops"]["strong"]["ok"], same["loops"]["strong"]["message"]


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
def test_loop_step(benchmark: Any, case: Case, loop: str) -> None:
    """Time one CBD batch step of ``loop`` on ``case`` (median over rounds)."""
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
    if loop != "floor":
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
    del runner
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Any:
    """After the module: print (and with CBD_BENCH_OUT write) the ratios table."""
    yield
    if not _TIMES:
        return
    summary = summarize(_TIMES, {c.id: _AGREEMENT.get(c) for c in CASES}, _UNAVAILABLE)
    text = summary_markdown(summary)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n" + text)
    else:
        print("\n" + text)
    out = os.environ.get("CBD_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "loop_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        Path(out, "loop_summary.md").write_text(text)


# ----------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What ran the benchmark: host, torch, threads, GPU name, date."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(DEVICE),
    }
    if DEVICE.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(DEVICE)
        info["cuda"] = torch.version.cuda
    return info


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
            if name == "floor":
                return None
            r = rep["loops"].get(name)
            if r is None:
                return "unchecked"
            return None if r["ok"] else "DISAGREE: " + r["message"]

        floor = t.get("floor")
        rows = {}
        for name, sec in t.items():
            rows[name] = {
                "median_s": sec,
                "images_per_s": None,
                "x_floor": (sec / floor) if floor else None,
            }
        speedups: dict[str, Any] = {}
        for fast in [n for n in t if n.startswith("cbd_fast") or n.startswith("strong")]:
            for base in ("naive", "strong", "cbd_fast"):
                if base not in t or base == fast or (base == "cbd_fast" and not fast.startswith("cbd_fast")):
                    continue
                problem = ok(fast) or ok(base)
                speedups[f"{fast} vs {base}"] = problem if problem else t[base] / t[fast]
        groups[gid] = {"loops": rows, "speedups": speedups, "unavailable": (unavailable or {}).get(gid, {})}
        for row in rows.values():
            bs = _batch_of(gid)
            row["images_per_s"] = bs / row["median_s"] if bs else None
    return {"machine": machine_info(), "tolerances": TOLERANCES, "groups": groups}


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
        f"torch {m['torch']}, {m['threads']} threads",
        "",
    ]
    for gid, g in summary["groups"].items():
        lines += [
            f"### {gid}",
            "",
            "| loop | ms / batch | images/s | x floor |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, r in g["loops"].items():
            xf = f"{r['x_floor']:.2f}" if r["x_floor"] else "-"
            lines.append(f"| {name} | {1e3 * r['median_s']:.1f} | {r['images_per_s']:.0f} | {xf} |")
        for name, why in g["unavailable"].items():
            lines.append(f"| {name} | {why[:80]} | | |")
        lines.append("")
        for k, v in g["speedups"].items():
            lines.append(f"- {k}: " + (f"{v:.2f}x" if isinstance(v, float) else str(v)))
        lines.append("")
    return "\n".join(lines)
