"""The logic of ``benchmarks/gpu_check.sh``: stage plan, result parsing, the PASS/FAIL verdict, summary.

    python benchmarks/run_gpu_check.py plan --stages "env:10 build:160 ..." --budget 450
    python benchmarks/run_gpu_check.py registered --out DIR        # CUDA kernels registered? (exit 1 if not)
    python benchmarks/run_gpu_check.py workload                    # the small run compute-sanitizer checks
    python benchmarks/run_gpu_check.py summarize --results DIR --stages STAGES.tsv --elapsed S
    python benchmarks/run_gpu_check.py selftest [--canned DIR]     # parsing and verdict on canned inputs
    python benchmarks/run_gpu_check.py check-files                 # every referenced file and test exists

Inputs ``summarize`` reads from the results folder (each optional; what is missing counts as not run):
``stages.tsv`` (name, status, seconds, note; written by gpu_check.sh), ``registered.json``,
``gpu_tests.xml`` (pytest's JUnit XML; ``gpu_tests.log``'s last summary line when the XML is
missing), ``bench_nt_xent.json`` / ``bench_pgd.json`` (pytest-benchmark JSON), ``sanitizer_*.log``
(compute-sanitizer), ``fallbacks.jsonl`` (backend fallbacks recorded during the run). It writes
``summary.json`` and ``summary.md`` and prints the PASS/FAIL lines, the last one being the verdict:

    FINAL: PASS|FAIL (...)

computed from the test counts: the build registered its CUDA kernels, the GPU tests ran with no
failure, no error and no skip other than ``ALLOWED_SKIPS`` (a skipped cuda or triton case fails the
check), the stage did not time out, compute-sanitizer (when it ran) found nothing, and no backend
fell back. The benchmark targets are printed as their own ``TARGET`` PASS/FAIL lines; they join the
verdict only with ``--strict-targets``. Exit status of ``summarize``: 0 for PASS, 1 for FAIL.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_TOTAL_S = 480  # the whole check must stay under 8 minutes
#: Skips that do not fail the check (substrings of the skip reason): hardware this machine lacks.
ALLOWED_SKIPS = ("needs two CUDA devices",)
#: Files gpu_check.sh runs or reads (checked by ``check-files``).
REFERENCED_FILES = (
    "setup.py",
    "benchmarks/gpu_check.sh",
    "benchmarks/bench_nt_xent.py",
    "benchmarks/bench_pgd.py",
    "tests/conftest.py",
    "tests/ops/test_nt_xent.py",
    "tests/ops/test_pgd.py",
    "tests/ops/test_backends.py",
    "tests/ops/test_fuzz_kernels.py",
    "tests/ops/test_triton_nt_xent.py",
    "tests/ops/test_gpu_extra.py",
    "cbd_fast/ops/_ext.py",
    "cbd_fast/ops/backends.py",
)
#: GPU tests the check relies on (function names that ``pytest --collect-only -m gpu`` must list).
REQUIRED_GPU_TESTS = (
    "test_gpu_backends_match_reference",
    "test_gpu_runs_where_eager_would_need_64_gib",
    "test_gpu_matches_reference_bit_exact",
    "test_fuzz_gpu_backends",
    "test_gpu_contract",
    "test_tensors_on_the_second_gpu",
    "test_non_default_stream",
    "test_cuda_graph_capture_and_replay",
    "test_torch_compile_fullgraph",
    "test_pgd_step_past_2_31_elements_bit_exact",
    "test_cuda_vs_triton_at_2n_131072_d_512_bf16",
)
#: Benchmark tests the bench stage selects (function names that must exist).
REQUIRED_BENCH_TESTS = {
    "benchmarks/bench_nt_xent.py": "test_ratio",
    "benchmarks/bench_pgd.py": "test_pgd_step_gpu_bandwidth",
}
#: The benchmark targets the summary reports (each must be measured: a missing one is a FAIL line).
EXPECTED_TARGETS = (
    "nt_xent fwdbwd 2N=8192 D=512 bfloat16 triton",
    "nt_xent fwdbwd 2N=8192 D=512 bfloat16 cuda",
    "pgd_step float32 cuda",
    "pgd_step bfloat16 cuda",
    "pgd_step float32 triton",
    "pgd_step bfloat16 triton",
)

# ---- stage plan --------------------------------------------------------------------------------------------


def parse_plan(text: str) -> list[tuple[str, int]]:
    """``"env:10 build:160"`` -> ``[("env", 10), ("build", 160)]``."""
    plan = []
    for item in text.split():
        name, _, limit = item.partition(":")
        if not name or not limit.isdigit():
            raise ValueError(f"stage {item!r} is not NAME:SECONDS")
        plan.append((name, int(limit)))
    return plan


def check_plan(plan: list[tuple[str, int]], budget: int, reserve: int) -> list[str]:
    """Problems with a stage plan: limits that do not fit the budget, a budget over 8 minutes."""
    problems = []
    total = sum(limit for _, limit in plan) + reserve
    if budget > MAX_TOTAL_S:
        problems.append(f"budget {budget} s is over the {MAX_TOTAL_S} s limit")
    if total > budget:
        problems.append(f"stage limits + summary reserve = {total} s > budget {budget} s")
    names = [n for n, _ in plan]
    if len(set(names)) != len(names):
        problems.append(f"duplicate stage names in {names}")
    return problems


# ---- pytest results ----------------------------------------------------------------------------------------

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)\b")
_SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] ([^:]+:\d+): (.*)$")


def _empty_counts() -> dict[str, Any]:
    return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "deselected": 0, "xfailed": 0, "xpassed": 0,
            "skips": [], "source": None}  # fmt: skip


def parse_pytest_summary(text: str) -> dict[str, Any] | None:
    """Counts from pytest's terminal output: its last summary line and the ``-rs`` SKIPPED lines.

    Returns None when the text holds no summary line (pytest did not finish).
    """
    summary = None
    for line in text.splitlines():
        stripped = line.strip().strip("=").strip()
        if re.search(r"\bin [\d.]+s\b", stripped) and _COUNT.search(stripped):
            summary = stripped
    if summary is None:
        if re.search(r"no tests ran in [\d.]+s", text):
            return _empty_counts() | {"source": "terminal"}
        return None
    counts = _empty_counts() | {"source": "terminal"}
    for n, kind in _COUNT.findall(summary):
        key = {"error": "errors", "warning": "warnings", "warnings": "warnings"}.get(kind, kind)
        if key in counts:
            counts[key] = int(n)
    for line in text.splitlines():
        m = _SKIP_LINE.match(line.strip())
        if m:
            counts["skips"] += [{"where": m.group(2), "reason": m.group(3)}] * int(m.group(1))
    return counts


def parse_junit(path: Path) -> dict[str, Any] | None:
    """Counts and skip reasons from a JUnit XML file written by ``pytest --junitxml`` (None if absent)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = _empty_counts() | {"source": "junit"}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
        elif case.find("error") is not None:
            counts["errors"] += 1
        elif (skip := case.find("skipped")) is not None:
            if skip.get("type") == "pytest.xfail":
                counts["xfailed"] += 1
            else:
                counts["skipped"] += 1
                counts["skips"].append({"where": name, "reason": skip.get("message", "")})
        else:
            counts["passed"] += 1
    return counts


def classify_skips(counts: dict[str, Any]) -> tuple[int, list[dict[str, str]]]:
    """``(allowed, disallowed)``: skips whose reason names hardware this machine lacks, and the rest."""
    allowed, bad = 0, []
    for skip in counts.get("skips", []):
        if any(a in skip["reason"] for a in ALLOWED_SKIPS):
            allowed += 1
        else:
            bad.append(skip)
    # skips counted by the summary line without a reason line: none can be shown to be allowed
    unexplained = counts.get("skipped", 0) - len(counts.get("skips", []))
    bad += [{"where": "?", "reason": "skipped (no reason reported)"}] * max(unexplained, 0)
    return allowed, bad


# ---- sanitizer, targets, fallbacks -------------------------------------------------------------------------


def parse_sanitizer(text: str) -> dict[str, Any]:
    """``{"errors": int | None, "summary": str}`` from a compute-sanitizer log (None: no summary line)."""
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", text)
    if m:
        return {"errors": int(m.group(1)), "summary": m.group(0)}
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if m:
        return {"errors": int(m.group(2)), "summary": m.group(0)}
    return {"errors": None, "summary": "no summary line (did not finish)"}


def bench_targets(nt_xent_json: Any, pgd_json: Any) -> dict[str, dict[str, Any]]:
    """Every recorded target: ``{label: {"value", "min", "pass", "text"}}``."""
    found: dict[str, dict[str, Any]] = {}
    for bench in (nt_xent_json or {}).get("benchmarks", []):
        info = bench.get("extra_info", {})
        for provider, t in (info.get("targets") or {}).items():
            dtype = str(info.get("dtype", "?")).removeprefix("torch.")
            label = f"nt_xent {info.get('mode')} 2N={info.get('2N')} D={info.get('D')} {dtype} {provider}"
            found[label] = {"value": t["speedup"], "min": t["min"], "pass": bool(t["pass"]),
                            "text": f"{t['speedup']:.2f}x eager (>= {t['min']}x)"}  # fmt: skip
    for bench in (pgd_json or {}).get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "fraction_of_copy" not in info:
            continue
        dtype = str(info.get("dtype", "?")).removeprefix("torch.")
        label = f"pgd_step {dtype} {info.get('backend')}"
        frac = float(info["fraction_of_copy"])
        goal = info.get("target", 0.85)
        found[label] = {"value": frac, "min": goal, "pass": frac >= goal,
                        "text": f"{frac:.1%} of copy bandwidth (>= {goal:.0%})"}  # fmt: skip
    return found


def target_lines(found: dict[str, dict[str, Any]], expected: tuple[str, ...] = EXPECTED_TARGETS) -> list[str]:
    lines = []
    for label in dict.fromkeys((*expected, *found)):
        t = found.get(label)
        if t is None:
            lines.append(f"TARGET {label}: FAIL (not measured)")
        else:
            lines.append(f"TARGET {label}: {t['text']}: {'PASS' if t['pass'] else 'FAIL'}")
    return lines


def read_fallbacks(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


# ---- the verdict -------------------------------------------------------------------------------------------


def verdict(
    counts: dict[str, Any] | None,
    *,
    registered: bool | None,
    tests_stage: str | None = "ok",
    sanitizer: dict[str, dict[str, Any]] | None = None,
    fallbacks: list[dict[str, Any]] | None = None,
    targets: dict[str, dict[str, Any]] | None = None,
    strict_targets: bool = False,
) -> tuple[bool, str, list[str]]:
    """``(ok, final_line, reasons)`` from the test counts and the checks around them (see module doc)."""
    reasons = []
    if registered is not True:
        reasons.append("CUDA kernels not registered" if registered is False else "registration not checked")
    if counts is None:
        reasons.append("no GPU test results")
        counts = _empty_counts()
    allowed, bad_skips = classify_skips(counts)
    if counts["failed"]:
        reasons.append(f"{counts['failed']} failed")
    if counts["errors"]:
        reasons.append(f"{counts['errors']} errors")
    if bad_skips:
        reasons.append(f"{len(bad_skips)} cuda/triton case(s) skipped: " + "; ".join(
            sorted({s["reason"][:80] for s in bad_skips}))[:300])  # fmt: skip
    if counts["passed"] == 0:
        reasons.append("no GPU test passed")
    if tests_stage not in ("ok", None):
        reasons.append(f"GPU test stage {tests_stage}")
    for tool, result in (sanitizer or {}).items():
        if result.get("errors") is None:
            reasons.append(f"compute-sanitizer {tool}: {result.get('summary')}")
        elif result["errors"]:
            reasons.append(f"compute-sanitizer {tool}: {result['errors']} errors")
    if fallbacks:
        which = "; ".join(
            f"{f.get('op')} {f.get('dtype')} {f.get('backend')}->{f.get('fallback')}" for f in fallbacks
        )
        reasons.append(f"{len(fallbacks)} backend fallback(s): {which[:300]}")
    missed = [k for k, t in (targets or {}).items() if not t["pass"]]
    if strict_targets and (missed or not targets):
        reasons.append(f"benchmark targets missed: {missed or 'none measured'}")
    ok = not reasons
    tally = (
        f"gpu tests: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped ({allowed} allowed)"
    )
    if targets is not None:
        tally += f"; targets met: {sum(t['pass'] for t in targets.values())}/{len(targets)}"
    line = f"FINAL: {'PASS' if ok else 'FAIL'} ({tally}" + ("" if ok else "; " + "; ".join(reasons)) + ")"
    return ok, line, reasons


# ---- summarize ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_stages(path: Path | None) -> list[dict[str, str]]:
    rows = []
    if path is None or not path.exists():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append(
                {"stage": parts[0], "status": parts[1], "seconds": parts[2], "note": "\t".join(parts[3:])}
            )
    return rows


def summarize(
    results: Path, stages_path: Path | None, elapsed: str, dry_run: bool, strict_targets: bool
) -> int:
    """Read everything in ``results``; write summary.json / summary.md; print the PASS/FAIL lines."""
    stages = read_stages(stages_path or results / "stages.tsv")
    status = {s["stage"]: s["status"] for s in stages}
    reg = _read_json(results / "registered.json")
    registered = None if reg is None else bool(reg.get("registered"))
    counts = parse_junit(results / "gpu_tests.xml")
    if counts is None and (results / "gpu_tests.log").exists():
        counts = parse_pytest_summary((results / "gpu_tests.log").read_text(errors="replace"))
    sanitizer = {}
    for log in sorted(results.glob("sanitizer_*.log")):
        sanitizer[log.stem.removeprefix("sanitizer_")] = parse_sanitizer(log.read_text(errors="replace"))
    targets = bench_targets(
        _read_json(results / "bench_nt_xent.json"), _read_json(results / "bench_pgd.json")
    )
    fallbacks = read_fallbacks(results / "fallbacks.jsonl")
    ok, final, reasons = verdict(
        counts,
        registered=registered,
        tests_stage="ok" if dry_run and status.get("gputests") == "dry" else status.get("gputests"),
        sanitizer=sanitizer,
        fallbacks=fallbacks,
        targets=targets,
        strict_targets=strict_targets,
    )
    tests_ok = bool(counts and counts["passed"] and not (counts["failed"] or counts["errors"]))
    tests_ok = tests_ok and not classify_skips(counts)[1]
    lines = [
        f"CHECK build + CUDA kernels registered: {'PASS' if registered else 'FAIL'}"
        + ("" if reg is None else f" ({reg.get('detail', '')})"),
        f"CHECK gpu tests: {'PASS' if tests_ok else 'FAIL'}",
    ]
    for tool, r in sanitizer.items():
        lines.append(
            f"CHECK compute-sanitizer {tool}: {'PASS' if r['errors'] == 0 else 'FAIL'} ({r['summary']})"
        )
    if not sanitizer:
        lines.append(f"CHECK compute-sanitizer: not run ({status.get('sanitizer', 'no stage')})")
    lines += target_lines(targets)
    lines.append(final)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": dry_run,
        "elapsed_s": elapsed,
        "stages": stages,
        "registered": reg,
        "gpu_tests": counts,
        "sanitizer": sanitizer,
        "targets": targets,
        "fallbacks": fallbacks,
        "pass": ok,
        "reasons": reasons,
        "lines": lines,
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    title = f"# cbd_fast GPU check{' (DRY RUN: canned inputs, CPU)' if dry_run else ''}"
    md = [
        title,
        "",
        f"{summary['date']}, {elapsed} s",
        "",
        "| stage | status | s | note |",
        "| --- | --- | ---: | --- |",
    ]
    md += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in stages]
    md += ["", "```", *lines, "```", ""]
    (results / "summary.md").write_text("\n".join(md))
    print("\n".join(lines))
    return 0 if ok else 1


# ---- registered, workload ----------------------------------------------------------------------------------


def registered(out: Path | None) -> int:
    """Exit 0 when the extension loads and every native op has a CUDA kernel in the dispatcher."""
    sys.path.insert(0, str(ROOT))
    import torch

    from cbd_fast.ops import _ext
    from cbd_fast.ops.backends import backend_status
    from cbd_fast.ops.build_info import build_info

    loaded = _ext.load() is not None
    kernels = {q: _ext.has_kernel(q, "CUDA") for qs in _ext.NATIVE_OPS.values() for q in qs} if loaded else {}
    ok = loaded and bool(kernels) and all(kernels.values())
    record = build_info()
    detail = (
        f"extension {'loaded' if loaded else 'NOT loaded: ' + str(_ext.load_error())}; CUDA kernels "
        + ", ".join(f"{q.split('::')[1]}={'yes' if v else 'NO'}" for q, v in kernels.items())
        + f"; record cuda_compiled={record.get('cuda_compiled')} archs={record.get('cuda_archs')}"
    )
    result = {
        "registered": ok,
        "detail": detail,
        "kernels": kernels,
        "build_record": record,
        "backends_cuda": backend_status("cuda") if torch.cuda.is_available() else None,
    }
    print(json.dumps(result, indent=2, default=str))
    if out is not None:
        (out / "registered.json").write_text(json.dumps(result, indent=2, default=str))
    return 0 if ok else 1


def workload() -> int:
    """A small run of every GPU kernel of both compiled backends (for compute-sanitizer)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from cbd_fast.ops import nt_xent, nt_xent_value_and_grad, pgd_step

    gen = torch.Generator(device="cuda").manual_seed(0)
    for backend in ("cuda", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(67, 40, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
            b = torch.randn(67, 40, device="cuda", dtype=dtype, generator=gen)
            nt_xent(a, b, 0.5, backend=backend).backward()
            nt_xent_value_and_grad(a.detach(), b, 0.5, backend=backend)
            x = torch.rand(10_007, device="cuda", dtype=dtype, generator=gen)
            pgd_step(x.clone(), torch.randn_like(x), x, 2 / 255, 8 / 255, backend=backend)
    torch.cuda.synchronize()
    print("workload done")
    return 0


# ---- self test on canned inputs ----------------------------------------------------------------------------

_CANNED_LOG = """\
tests/ops/test_nt_xent.py ....s.                                              [ 50%]
=========================== short test summary info ============================
SKIPPED [1] tests/ops/test_triton_nt_xent.py:226: needs two CUDA devices (multi-GPU guard test)
SKIPPED [2] tests/ops/test_nt_xent.py:383: triton: no CUDA device is visible
==================== 118 passed, 3 skipped, 4 deselected, 2 warnings in 95.31s (0:01:35) ====================
"""


def _junit(cases: list[tuple[str, str | None, str]]) -> str:
    body = []
    for name, outcome, message in cases:
        inner = ""
        if outcome == "skipped":
            inner = f'<skipped type="pytest.skip" message="{message}"/>'
        elif outcome == "failure":
            inner = f'<failure message="{message}"/>'
        elif outcome == "error":
            inner = f'<error message="{message}"/>'
        body.append(f'<testcase classname="tests.ops.test_x" name="{name}" time="0.1">{inner}</testcase>')
    return (
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>'
    )


def _bench_json() -> tuple[dict, dict]:
    ntx = {"benchmarks": [{"name": "test_ratio[fwdbwd-2N8192-D512-bfloat16]", "extra_info": {
        "mode": "fwdbwd", "2N": 8192, "D": 512, "dtype": "torch.bfloat16",
        "targets": {"triton": {"speedup": 6.5, "min": 2.0, "pass": True},
                    "cuda": {"speedup": 1.4, "min": 2.0, "pass": False}}}}]}  # fmt: skip
    pgd = {"benchmarks": [{"name": f"test_pgd_step_gpu_bandwidth[{dt}-{b}]", "extra_info": {
        "backend": b, "dtype": f"torch.{dt}", "fraction_of_copy": frac, "target": 0.85}}
        for (b, dt, frac) in (("cuda", "float32", 0.93), ("cuda", "bfloat16", 0.91),
                              ("triton", "float32", 0.88), ("triton", "bfloat16", 0.80))]}  # fmt: skip
    return ntx, pgd


def selftest(canned: Path | None) -> int:
    """Assert the parsing and the verdict on canned inputs; with ``canned``, also write a complete
    canned results folder there (what a passing GPU run leaves) for gpu_check.sh --dry-run."""
    import tempfile

    # terminal summary line and -rs lines
    c = parse_pytest_summary(_CANNED_LOG)
    assert (c["passed"], c["skipped"], c["failed"], c["deselected"]) == (118, 3, 0, 4), c
    allowed, bad = classify_skips(c)
    assert allowed == 1 and len(bad) == 2 and "no CUDA device" in bad[0]["reason"], (allowed, bad)
    assert parse_pytest_summary("3 failed, 1 error in 1.00s")["errors"] == 1
    assert parse_pytest_summary("collected 10 items\nKilled") is None  # pytest did not finish
    assert parse_pytest_summary("no tests ran in 0.50s")["passed"] == 0
    # JUnit XML
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "r.xml"
        xml.write_text(_junit([("a", None, ""), ("b", "skipped", "needs two CUDA devices (multi-GPU)"),
                               ("c", "skipped", "cuda: extension built without CUDA kernels"),
                               ("d", "failure", "assert 1 == 2"), ("e", "error", "fixture")]))  # fmt: skip
        j = parse_junit(xml)
        assert (j["passed"], j["skipped"], j["failed"], j["errors"]) == (1, 2, 1, 1), j
        assert parse_junit(Path(tmp) / "missing.xml") is None
    # the verdict
    good = _empty_counts() | {
        "passed": 120,
        "skipped": 1,
        "skips": [{"where": "x", "reason": "needs two CUDA devices"}],
    }
    ok, line, _ = verdict(good, registered=True)
    assert ok and line.startswith(
        "FINAL: PASS (gpu tests: 120 passed, 0 failed, 0 errors, 1 skipped (1 allowed)"
    ), line
    cases = {
        "not registered": (dict(good), {"registered": False}),
        "a failure": (good | {"failed": 1}, {"registered": True}),
        "an error": (good | {"errors": 2}, {"registered": True}),
        "a skipped cuda case": (
            good | {"skipped": 2, "skips": good["skips"] + [{"where": "y", "reason": "cuda: x"}]},
            {"registered": True},
        ),  # fmt: skip
        "a skip without a reason": (good | {"skipped": 2}, {"registered": True}),
        "nothing passed": (_empty_counts(), {"registered": True}),
        "no results": (None, {"registered": True}),
        "timeout": (dict(good), {"registered": True, "tests_stage": "timeout"}),
        "sanitizer errors": (
            dict(good),
            {"registered": True, "sanitizer": {"memcheck": {"errors": 3, "summary": ""}}},
        ),
        "sanitizer unfinished": (
            dict(good),
            {"registered": True, "sanitizer": {"racecheck": {"errors": None}}},
        ),
        "a fallback": (
            dict(good),
            {"registered": True, "fallbacks": [{"op": "nt_xent", "backend": "triton"}]},
        ),
    }
    for what, (counts, kwargs) in cases.items():
        ok, line, reasons = verdict(counts, **kwargs)
        assert not ok and line.startswith("FINAL: FAIL") and reasons, (what, line)
    # benchmark targets: lines for every expected target, missing ones FAIL; strict mode folds them in
    ntx, pgd = _bench_json()
    found = bench_targets(ntx, pgd)
    lines = target_lines(found)
    assert "TARGET nt_xent fwdbwd 2N=8192 D=512 bfloat16 triton: 6.50x eager (>= 2.0x): PASS" in lines, lines
    assert any(
        s.startswith("TARGET nt_xent fwdbwd 2N=8192 D=512 bfloat16 cuda") and s.endswith("FAIL")
        for s in lines
    )
    assert any(s.startswith("TARGET pgd_step bfloat16 triton: 80.0%") and s.endswith("FAIL") for s in lines)
    assert target_lines({})[0].endswith("FAIL (not measured)")
    assert verdict(good, registered=True, targets=found)[0]  # targets alone do not fail the verdict ...
    assert not verdict(good, registered=True, targets=found, strict_targets=True)[0]  # ... unless strict
    # sanitizer logs
    assert parse_sanitizer("========= ERROR SUMMARY: 0 errors")["errors"] == 0
    assert (
        parse_sanitizer("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)")["errors"]
        == 1
    )
    assert parse_sanitizer("Killed")["errors"] is None
    # the stage plan
    assert check_plan(parse_plan("a:100 b:200"), 400, 10) == []
    assert check_plan(parse_plan("a:300 b:200"), 480, 10) and check_plan([], 500, 0)
    if canned is not None:
        canned.mkdir(parents=True, exist_ok=True)
        passing = [(f"test_{i}", None, "") for i in range(12)] + [
            ("test_2gpu", "skipped", "needs two CUDA devices")
        ]
        (canned / "gpu_tests.xml").write_text(_junit(passing))
        (canned / "registered.json").write_text(json.dumps({"registered": True, "detail": "canned"}))
        (canned / "bench_nt_xent.json").write_text(json.dumps(ntx))
        (canned / "bench_pgd.json").write_text(json.dumps(pgd))
        (canned / "sanitizer_memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
        (canned / "fallbacks.jsonl").write_text("")
    print("selftest: parsing, skip classification, verdict, targets, sanitizer and plan checks passed")
    return 0


def check_files() -> int:
    """Every file gpu_check.sh uses exists; every GPU test and benchmark it relies on is collected."""
    missing = [f for f in REFERENCED_FILES if not (ROOT / f).exists()]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            "tests/ops",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    collected = {line.split("::")[-1].split("[")[0] for line in proc.stdout.splitlines() if "::" in line}
    absent = [t for t in REQUIRED_GPU_TESTS if t not in collected]
    for path, fn in REQUIRED_BENCH_TESTS.items():
        if (ROOT / path).exists() and f"def {fn}(" not in (ROOT / path).read_text():
            absent.append(f"{path}::{fn}")
    print(f"check-files: {len(REFERENCED_FILES)} files, {len(collected)} gpu test functions collected")
    if proc.returncode not in (0, 5):
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        print(f"check-files: pytest --collect-only failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    if missing or absent:
        print(f"check-files: missing files {missing}; missing tests {absent}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("plan", help="check a stage plan against the budget")
    s.add_argument("--stages", required=True)
    s.add_argument("--budget", type=int, required=True)
    s.add_argument("--reserve", type=int, default=0)
    s = sub.add_parser("registered", help="exit 0 when every op has a CUDA kernel registered")
    s.add_argument("--out", type=Path, default=None)
    sub.add_parser("workload", help="small GPU run of both backends (for compute-sanitizer)")
    s = sub.add_parser("summarize", help="write summary.json / summary.md, print PASS/FAIL lines")
    s.add_argument("--results", type=Path, required=True)
    s.add_argument("--stages", type=Path, default=None)
    s.add_argument("--elapsed", default="?")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--strict-targets", action="store_true", help="missed benchmark targets fail the verdict")
    s = sub.add_parser("selftest", help="parsing and verdict on canned inputs")
    s.add_argument("--canned", type=Path, default=None, help="also write a canned results folder here")
    sub.add_parser("check-files", help="every referenced file and test exists")
    args = p.parse_args(argv)
    if args.cmd == "plan":
        plan = parse_plan(args.stages)
        problems = check_plan(plan, args.budget, args.reserve)
        total = sum(lim for _, lim in plan) + args.reserve
        print(f"plan: {len(plan)} stages: {total} s of limits with the reserve; budget {args.budget} s")
        for line in problems:
            print(f"plan: {line}", file=sys.stderr)
        return 1 if problems else 0
    if args.cmd == "registered":
        return registered(args.out)
    if args.cmd == "workload":
        return workload()
    if args.cmd == "summarize":
        return summarize(args.results, args.stages, args.elapsed, args.dry_run, args.strict_targets)
    if args.cmd == "selftest":
        return selftest(args.canned)
    return check_files()


if __name__ == "__main__":
    sys.exit(main())
