"""The time-to-purify benchmark's harness runs (a synthetic quick case, no models trained): its
contenders (with a candidate setting), the paper loop and the ratios it prints and stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_purify_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "ttp.json"
    env = {**os.environ, "CBD_BENCH_QUICK": "1", "CBD_BENCH_THREADS": "1"}
    env["CBD_TTP_CANDIDATE"] = "free_replays=2"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "benchmarks" / "bench_time_to_purify.py"),
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "purify / plain_ft = " in res.stdout and "previous / purify = " in res.stdout
    info = json.loads(out.read_text())["benchmarks"][0]["extra_info"]
    assert "candidate / plain_ft = " in res.stdout and info["candidate"] == {"free_replays": 2}
    for key in ("purify", "previous", "plain_ft", "candidate"):
        assert len(info["rounds_s"][key]) == 1 and info["medians_s"][key] > 0
    assert info["paper_curve"] and info["paper_curve"][0]["epoch"] == 1
    assert info["purify_over_plain_ft"] == info["medians_s"]["purify"] / info["medians_s"]["plain_ft"]
    assert isinstance(info["channels_last"], bool)
