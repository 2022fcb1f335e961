"""Summarise a ``benchmarks/gpu_check.sh`` run into ``$OUT/summary.md`` and ``$OUT/summary.json``.

    python benchmarks/run_gpu_check.py summarize --scratch DIR --out OUT --stages STAGES.tsv

Reads the stage table (name, status, seconds, note), each bench_loop stage's ``loop_summary.json``
(ratios, agreement) from ``SCRATCH/<stage>/`` and the pytest-benchmark JSON files
``SCRATCH/<stage>.json`` (op benchmarks: name, group, median); writes ``OUT/summary.json``,
``OUT/summary.md`` and ``OUT/bench_raw.json`` ({stage: pytest-benchmark JSON}: split it back with
``json.load`` to use ``--benchmark-compare``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

LOOP_STAGES = ("loop", "options", "vit", "compile")
OP_STAGES = ("ops_nt_xent", "ops_pgd")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stages(path: Path | None) -> list[dict[str, str]]:
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


def _bench_rows(data: Any) -> list[dict[str, Any]]:
    rows = []
    for b in (data or {}).get("benchmarks", []):
        st = b.get("stats", {})
        rows.append(
            {
                "name": b.get("name"),
                "group": b.get("group"),
                "median_ms": 1e3 * st.get("median", float("nan")),
                "iqr_ms": 1e3 * st.get("iqr", float("nan")),
                "rounds": st.get("rounds"),
                "extra_info": {k: v for k, v in b.get("extra_info", {}).items() if k != "agreement"},
            }
        )
    return rows


def summarize(
    scratch: Path | None, out: Path, stages: Path | None, elapsed: str, dry_run: str
) -> dict[str, Any]:
    """Collect everything into one dict; write summary.json and summary.md into ``out``."""
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": dry_run == "1",
        "elapsed_s": elapsed,
        "stages": _stages(stages),
        "loops": {},
        "ops": [],
        "machine": None,
    }
    raw: dict[str, Any] = {}
    for name in (*LOOP_STAGES, *OP_STAGES):
        data = _read_json(scratch / f"{name}.json") if scratch else None
        if data is not None:
            raw[name] = data
    for name in LOOP_STAGES:
        loop = _read_json(scratch / name / "loop_summary.json") if scratch else None
        if loop is not None:
            summary["loops"][name] = loop
            summary["machine"] = summary["machine"] or loop.get("machine")
        elif name in raw:
            summary["loops"][name] = {"raw": _bench_rows(raw[name])}
    for name in OP_STAGES:
        summary["ops"] += [{"stage": name, **row} for row in _bench_rows(raw.get(name))]
    if raw:
        (out / "bench_raw.json").write_text(json.dumps(raw, default=str))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The short table printed last by gpu_check.sh."""
    m = summary.get("machine") or {}
    lines = [
        f"# cbd_fast GPU check{' (DRY RUN, CPU)' if summary['dry_run'] else ''}",
        "",
        f"{summary['date']}; {m.get('gpu') or m.get('cpu', '?')}; torch {m.get('torch', '?')}; "
        f"elapsed {summary['elapsed_s']} s",
        "",
        "| stage | status | s | note |",
        "| --- | --- | ---: | --- |",
    ]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['note']} |")
    for name, loop in summary["loops"].items():
        lines += ["", f"## {name}"]
        if "raw" in loop:
            for r in loop["raw"]:
                lines.append(f"- {r['name']}: {r['median_ms']:.1f} ms")
            continue
        for gid, g in loop.get("groups", {}).items():
            lines += [
                "",
                f"{gid}:",
                "",
                "| loop | ms/batch | img/s | x floor | vs naive: loss / update rel diff |",
                "| --- | ---: | ---: | ---: | --- |",
            ]
            for ln, r in g["loops"].items():
                xf = f"{r['x_floor']:.2f}" if r.get("x_floor") else "-"
                ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "-"
                a = g.get("agreement", {}).get(ln)
                agree = "-"
                if a is not None:
                    agree = ("ok " if a["ok"] else "FAIL ") + "; ".join(
                        f"{c['precision']}: {c['loss_rdiff']:.1e} / {c['update_rdiff']:.1e}"
                        for c in a.get("checks", [])
                        if c.get("loss_rdiff") is not None
                    )
                lines.append(f"| {ln} | {1e3 * r['median_s']:.1f} | {ips} | {xf} | {agree} |")
            for ln, why in g.get("unavailable", {}).items():
                lines.append(f"| {ln} | n/a: {str(why)[:90]} | | | |")
            for k, v in g.get("speedups", {}).items():
                lines.append(f"- {k}: " + (f"**{v:.2f}x**" if isinstance(v, float) else str(v)[:200]))
    if summary["ops"]:
        lines += [
            "",
            "## ops",
            "",
            "| benchmark | group | median ms | ratios |",
            "| --- | --- | ---: | --- |",
        ]
        for r in summary["ops"]:
            ratios = {k: v for k, v in r["extra_info"].items() if "ratio" in k or "speedup" in k}
            lines.append(f"| {r['name']} | {r['group']} | {r['median_ms']:.3f} | {_short(ratios)} |")
    return "\n".join(lines) + "\n"


def _short(d: dict[str, Any]) -> str:
    parts = []
    for k, v in d.items():
        parts.append(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={str(v)[:60]}")
    return ", ".join(parts)[:200]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``summarize`` subcommand)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="write summary.md / summary.json")
    s.add_argument("--scratch", type=Path, default=None, help="folder holding <stage>/loop_summary.json")
    s.add_argument("--out", type=Path, required=True, help="output folder (holds the pytest-benchmark JSONs)")
    s.add_argument("--stages", type=Path, default=None, help="stage table (TSV) written by gpu_check.sh")
    s.add_argument("--elapsed", default="?", help="seconds the check took")
    s.add_argument("--dry-run", default="0", help="1 when the check ran in --dry-run mode")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summarize(args.scratch, args.out, args.stages, args.elapsed, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
