"""Crash safety: ``purify`` with checkpoints in a subprocess, SIGKILLed at random moments (one trial
inside a checkpoint write), resumed; the final weights equal an uninterrupted run's exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cbd_fast import PurifyConfig
from cbd_fast.core import checkpoint as ckpt

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from torch import nn
    import cbd_fast

    ckpt_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    enc = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 16),
    )
    x = torch.rand(96, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    print("ready", flush=True)
    # The DEFAULT adversary (stateful: scanned patches, a persistent warp field, both checkpointed).
    model = cbd_fast.purify(
        enc, x, epochs=10, batch_size=16, steps=3, optimizer="sgd", bn_policy="train",
        augmentation="crop_flip", checkpoint_dir=ckpt_dir if ckpt_dir != "-" else None,
        resume=ckpt_dir != "-", progress=False,
    )
    torch.save(model.state_dict(), out)
    print("done", flush=True)
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CBD_FAST_TEST_CKPT_SLEEP"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(ckpt_dir: str, out: Path, **env: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, ckpt_dir, str(out)],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _start(ckpt_dir: Path, out: Path, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(ckpt_dir), str(out)],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until imports are done and the run starts
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def _assert_same(a: Path, b: Path, what: str) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, f"{what}: weights differ from the uninterrupted run in {bad}"


def _assert_checkpoints_verify(d: Path) -> None:
    for _, p in ckpt.list_checkpoints(d):
        ckpt.load_checkpoint(p)  # raises on a torn file: final names only ever hold whole files


def _wait_for_epoch(proc: subprocess.Popen, d: Path, epoch: int) -> None:
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        done = ckpt.list_checkpoints(d)
        if done and done[-1][0] >= epoch:
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The uninterrupted run, in this process (same code, one thread: bit-identical to a subprocess).
    reference = tmp_path / "reference.pt"
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["worker", "-", str(reference)])
    try:
        exec(compile(WORKER, "worker", "exec"), {"__name__": "worker"})
    finally:
        torch.set_num_threads(threads)
    rng = random.Random(1234)
    kills = []

    # Trials 1-2: two and one SIGKILLs at random moments: after a random number of finished epochs
    # (0-9 of 10) plus a random fraction of an epoch, so the kills land all over the run.
    for trial, n_kills in enumerate((2, 1)):
        d, out = tmp_path / f"ck{trial}", tmp_path / f"out{trial}.pt"
        for epoch in sorted(rng.sample(range(10), n_kills)):
            proc = _start(d, out)
            _wait_for_epoch(proc, d, epoch)
            delay = rng.uniform(0.0, 0.3)
            time.sleep(delay)
            _kill(proc)
            kills.append((trial, epoch, round(delay, 3), [e for e, _ in ckpt.list_checkpoints(d)]))
            _assert_checkpoints_verify(d)
        _run(str(d), out)
        _assert_same(out, reference, f"trial {trial} (kills: {kills})")

    # Trial 3: SIGKILL while a checkpoint is half written (the test hook pauses mid-write).
    d, out = tmp_path / "ck_write", tmp_path / "out_write.pt"
    proc = _start(d, out, CBD_FAST_TEST_CKPT_SLEEP="30")
    deadline = time.monotonic() + 120
    while not list(d.glob(".purify-epoch*.ckpt.*")):
        assert proc.poll() is None, "worker exited before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint write started"
        time.sleep(0.02)
    time.sleep(0.2)
    _kill(proc)
    (tmp,) = list(d.glob(".purify-epoch*.ckpt.*"))
    assert tmp.stat().st_size > 0, "the kill should leave a half-written temporary file"
    assert ckpt.list_checkpoints(d) == [], "a half-written checkpoint must never appear under its final name"
    _run(str(d), out)
    _assert_same(out, reference, "killed during a checkpoint write")
    assert not list(d.glob(".purify-epoch*.ckpt.*")), "stale temporary file not cleaned"
    assert [e for e, _ in ckpt.list_checkpoints(d)] == [9, 10]
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(d)[-1][1])
    assert state["config"]["adversary"] == PurifyConfig().adversary and "adversary" in state
