"""The time-to-purify benchmark's harness runs (a synthetic quick case, no models trained): its
contenders (with a candidate setting), the paper loop and the ratios it prints and stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_benchmark(script: str, env: dict[str, str], out: Path) -> tuple[str, dict]:
    """``benchmarks/<script>`` in a subprocess with ``env``: (its stdout, the first case's extra_info)."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / script), "-q", "-s"]
        + ["-p", "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout, json.loads(out.read_text())["benchmarks"][0]["extra_info"]


def test_time_to_purify_quick_run(tmp_path: Path) -> None:
    env = {**os.environ, "CBD_BENCH_QUICK": "1", "CBD_BENCH_THREADS": "1"}
    # a dict value keeps its commas: the candidate below has two overrides, not three
    env["CBD_TTP_CANDIDATE"] = "free_replays=2,adversary_options={'scan_ascent':1,'mask_window':0.0}"
    stdout, info = _run_benchmark("bench_time_to_purify.py", env, tmp_path / "ttp.json")
    assert "purify / plain_ft = " in stdout and "previous / purify = " in stdout
    want = {"free_replays": 2, "adversary_options": {"scan_ascent": 1, "mask_window": 0.0}}
    assert "candidate / plain_ft = " in stdout and info["candidate"] == want
    for key in ("purify", "previous", "plain_ft", "candidate"):
        assert len(info["rounds_s"][key]) == 1 and info["medians_s"][key] > 0
    assert info["paper_curve"] and info["paper_curve"][0]["epoch"] == 1
    assert info["purify_over_plain_ft"] == info["medians_s"]["purify"] / info["medians_s"]["plain_ft"]
    assert isinstance(info["channels_last"], bool)


def test_time_to_purify_synthetic_encoder(tmp_path: Path) -> None:
    """``CBD_TTP_ENCODER``: a random models.py encoder on random images, cost only (no ASR)."""
    env = {**os.environ, "CBD_BENCH_THREADS": "1", "CBD_BENCH_ROUNDS": "1", "CBD_TTP_DEVICE": "cpu"}
    env.update(CBD_TTP_ENCODER="fmnist_cnn", CBD_TTP_IMAGES="64", CBD_TTP_SET="epochs=1,batch_size=32")
    env.pop("CBD_BENCH_QUICK", None)
    stdout, info = _run_benchmark("bench_time_to_purify.py", env, tmp_path / "ttp_synthetic.json")
    assert "synthetic fmnist_cnn on cpu (float32): cost only" in stdout
    assert info["synthetic"] and info["device"] == "cpu" and info["images"] == 64
    assert info["paper_curve"][0]["epoch"] == 1 and len(info["paper_curve"]) == 1
    assert info["paper_epoch_over_purify_epoch"] > 0 and info["medians_s"]["plain_ft"] > 0


def test_loop_agreement_starts_every_loop_from_the_same_point() -> None:
    """The loop benchmark's agreement check: cbd_fast runs from the reference's random start (its
    first-step loss and gradients equal naive's to rounding), and a semantic difference that leaves
    the first gradient unchanged (lr x 1.1) is still caught by the weight updates, also by the split
    check (fine-tune on naive's x_adv); an attack difference (step size x 1.5) fails its attack check."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_loop
        from models import build_encoder
        from reference_loops import check_agreement
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    enc = build_encoder("fmnist_cnn", seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 1, 28, 28, generator=g) for _ in range(2)]
    cfg = bench_loop.bench_config(steps=2, batch_size=8, device="cpu")
    loops = check_agreement(enc, batches, cfg, ["naive", "strong", "cbd_fast"], "cpu")["loops"]
    for name in ("strong", "cbd_fast"):
        assert loops[name]["ok"], loops[name]["message"]
        assert loops[name]["first_loss_rdiff"] < 1e-5 and loops[name]["first_grad_rdiff"] < 1e-4
    changed = {
        "cbd_fast": cfg.replace(lr=cfg.lr * 1.1),
        "cbd_fast+cl": cfg.replace(step_size=cfg.step_size * 1.5),
    }
    report = check_agreement(enc, batches, cfg, ["naive", *changed], "cpu", configs=changed)["loops"]
    rec = report["cbd_fast"]
    assert not rec["ok"] and rec["agreement"] is None and rec["first_grad_rdiff"] < 1e-4
    assert min(rec["update_rdiff"], rec["weighted_update_rdiff"]) > 0.05
    ft = rec["split"]["finetune"]  # same x_adv, lr x 1.1: the updates still differ
    assert not rec["split"]["ok"] and not ft["ok"] and ft["first_grad_rdiff"] < 1e-4, rec["message"]
    rec = report["cbd_fast+cl"]  # step size x 1.5: same fine-tune, most x_adv pixels elsewhere
    assert not rec["ok"] and rec["agreement"] is None, rec["message"]
    assert rec["split"]["finetune"]["ok"] and not rec["split"]["attack"]["ok"], rec["message"]
    assert rec["split"]["attack"]["pixel_share"] > 0.2, rec["message"]


def test_scan_benchmark_quick_run(tmp_path: Path) -> None:
    """bench_scan.py: halving against the full scan, the same masks, far fewer image forwards."""
    env = {**os.environ, "CBD_BENCH_QUICK": "1", "CBD_BENCH_THREADS": "1"}
    env.pop("CBD_BENCH_FULL", None)
    _, info = _run_benchmark("bench_scan.py", env, tmp_path / "scan.json")
    assert info["encoder"] == "fmnist_cnn" and info["same_choice"] is True
    fill = info["fill_ascent_image_forwards"]
    assert fill["full"] == fill["halving"] > 0  # the own-pattern fills: raised on the same ~4 images
    assert (info["halving_image_forwards"] - fill["halving"]) * 4 <= info["full_image_forwards"] - fill[
        "full"
    ]
    assert info["speedup"] == info["full_median_s"] / info["halving_median_s"]
