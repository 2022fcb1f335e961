"""Benchmarks of the fused PGD step and the input-only-gradient attack step (pytest-benchmark).

Each comparison first checks that the two sides agree, then times them interleaved in the same
run (alternating rounds, medians) and records the ratio in the benchmark's ``extra_info`` (so the
JSON carries it); pytest-benchmark itself times the fast side.

- ``test_pgd_step_cpu``: ``pgd_step`` (cpp backend) vs the eager composition on 4M-element float32
  tensors. Target: >= 2x.
- ``test_attack_step_cpu``: ``contrastive_pgd`` (frozen parameters, ``torch.autograd.grad`` on the
  input, fused step) vs the naive step (``loss.backward()`` with parameter gradients, eager update)
  on a small CNN, per PGD step. Target: >= 1.3x.
- ``test_pgd_step_gpu_bandwidth`` (CUDA only): achieved bandwidth of ``pgd_step`` (cuda and triton
  backends; 3 reads + 1 write per element) against a device-to-device copy (1 read + 1 write) of
  the same tensors. Target: >= 85% of the copy's bandwidth: ``extra_info["target_pass"]`` and a
  ``TARGET ... PASS|FAIL`` line (``CBD_BENCH_ASSERT=1`` also fails the test when missed).

Run::

    python -m pytest benchmarks/bench_pgd.py -p no:cacheprovider -s \
        --benchmark-json=benchmarks/results/pgd_cpu.json

Environment: ``CBD_BENCH_ROUNDS`` (interleaved rounds per side, default 15 CPU / 30 CUDA),
``CBD_BENCH_QUICK=1`` (small sizes, 3 rounds: a smoke run for CI), ``CBD_BENCH_THREADS``
(``torch.set_num_threads`` for the run; 1 gives steadier CPU ratios on a shared machine).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cbd_fast.core.attack import contrastive_pgd
from cbd_fast.ops import _ext, nt_xent, pgd_step
from cbd_fast.ops.reference import pgd_step_reference

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

QUICK = os.environ.get("CBD_BENCH_QUICK", "") not in ("", "0")
if os.environ.get("CBD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CBD_BENCH_THREADS"]))
EPS, STEP, TAU = 8 / 255, 2 / 255, 0.5
N_CPU = 2**16 if QUICK else 4 * 2**20
N_GPU = 2**20 if QUICK else 64 * 2**20


def _rounds(default: int) -> int:
    return 3 if QUICK else int(os.environ.get("CBD_BENCH_ROUNDS", default))


def eager_pgd_step(x_adv, grad, x_clean, step_size, epsilon, lower=0.0, upper=1.0):
    """The update as plain PyTorch code writes it: sign, scale, add, ball bounds, clamps, copy."""
    y = x_adv + step_size * grad.sign()
    y = torch.min(torch.max(y, x_clean - epsilon), x_clean + epsilon)
    return x_adv.copy_(y.clamp_(lower, upper))


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, sync=lambda: None) -> dict:
    """Median seconds per call of each function, timed in alternating rounds after one warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cuda_interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, reps: int = 10) -> dict:
    """Median seconds per call on the GPU: CUDA events around ``reps`` back-to-back calls, rounds
    alternating between the functions (launch overhead amortised, no host timing in the window)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / reps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _inputs(n, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    xc = torch.rand(n, generator=g)
    xa = torch.clamp(xc + EPS * (2 * torch.rand(n, generator=g) - 1), 0, 1)
    grad = torch.randn(n, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (xa, grad, xc))


@pytest.mark.skipif(_ext.load() is None, reason="the cpp backend needs the compiled extension")
def test_pgd_step_cpu(benchmark):
    xa, grad, xc = _inputs(N_CPU)
    # Agreement: fused == eager == reference (bit for bit on these finite inputs).
    fused, eager = xa.clone(), xa.clone()
    pgd_step(fused, grad, xc, STEP, EPS, backend="cpp")
    eager_pgd_step(eager, grad, xc, STEP, EPS)
    assert torch.equal(fused, eager)
    assert torch.equal(fused, pgd_step_reference(xa.clone(), grad, xc, STEP, EPS))

    a, b = xa.clone(), xa.clone()
    med = interleaved_medians(
        {
            "fused": lambda: pgd_step(a, grad, xc, STEP, EPS, backend="cpp"),
            "eager": lambda: eager_pgd_step(b, grad, xc, STEP, EPS),
        },
        _rounds(15),
    )
    speedup = med["eager"] / med["fused"]
    gbps = 4 * N_CPU * 4 / med["fused"] / 1e9
    benchmark.extra_info.update(
        n=N_CPU,
        dtype="float32",
        threads=torch.get_num_threads(),
        fused_median_ms=med["fused"] * 1e3,
        eager_median_ms=med["eager"] * 1e3,
        speedup_vs_eager=speedup,
        fused_gb_per_s=gbps,
        target=2.0,
    )
    print(
        f"\npgd_step cpu n={N_CPU}: fused {med['fused'] * 1e3:.2f} ms, eager {med['eager'] * 1e3:.2f} ms, "
        f"speedup {speedup:.2f}x (target 2x), fused {gbps:.1f} GB/s"
    )
    c = xa.clone()
    benchmark.pedantic(
        lambda: pgd_step(c, grad, xc, STEP, EPS, backend="cpp"), rounds=_rounds(15), warmup_rounds=1
    )


def _small_cnn() -> torch.nn.Module:
    from models import build_encoder  # benchmarks/models.py: the demo's Fashion-MNIST backbone

    return build_encoder("fmnist_cnn", seed=0)


def naive_attack(encoder, x, clean, steps):
    """CBD step 2 as a first implementation writes it: loss.backward() (parameter gradients
    included) and the eager update. BatchNorm/dropout in eval mode, as in contrastive_pgd."""
    was_training = encoder.training
    encoder.eval()
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = nt_xent(encoder(x_adv), clean, TAU)
        encoder.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            x_adv = eager_pgd_step(x_adv.detach(), x_adv.grad, x, STEP, EPS)
    encoder.zero_grad(set_to_none=True)
    encoder.train(was_training)
    return x_adv.detach()


def test_attack_step_cpu(benchmark):
    batch, steps = (16, 2) if QUICK else (128, 5)
    enc = _small_cnn()
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = enc.eval()(x)
    enc.train()

    def fast():
        return contrastive_pgd(
            enc, x, clean, epsilon=EPS, step_size=STEP, steps=steps, temperature=TAU, random_start=False
        )

    # Agreement: same start, same loss op; the input gradients agree up to summation order, so
    # nearly every element takes the same steps and all stay within two steps of each other.
    a, b = fast(), naive_attack(enc, x, clean, steps)
    same = (a == b).float().mean().item()
    assert same > 0.99 and (a - b).abs().max().item() <= 2 * STEP + 1e-6, same

    med = interleaved_medians(
        {"input_only": fast, "naive": lambda: naive_attack(enc, x, clean, steps)}, _rounds(7)
    )
    speedup = med["naive"] / med["input_only"]
    benchmark.extra_info.update(
        encoder="fmnist_cnn",
        batch=batch,
        steps=steps,
        threads=torch.get_num_threads(),
        input_only_ms_per_step=med["input_only"] / steps * 1e3,
        naive_ms_per_step=med["naive"] / steps * 1e3,
        speedup_per_step=speedup,
        identical_fraction=same,
        target=1.3,
    )
    print(
        f"\nattack step cpu (fmnist_cnn bs {batch}): "
        f"input-only {med['input_only'] / steps * 1e3:.1f} ms/step, "
        f"naive {med['naive'] / steps * 1e3:.1f} ms/step, speedup {speedup:.2f}x (target 1.3x)"
    )
    benchmark.pedantic(fast, rounds=_rounds(7), warmup_rounds=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pgd_step_gpu_bandwidth(benchmark, backend, dtype):
    if backend == "cuda" and not _ext.has_cuda():
        pytest.skip("extension built without CUDA kernels")
    xa, grad, xc = _inputs(N_GPU, dtype, "cuda")
    out = xa.clone()
    pgd_step(out, grad, xc, STEP, EPS, backend=backend)
    want = pgd_step_reference(xa.clone(), grad, xc, STEP, EPS)
    assert torch.equal(out, want)
    dst = torch.empty_like(xa)
    sync = torch.cuda.synchronize
    med = cuda_interleaved_medians(
        {
            "pgd_step": lambda: pgd_step(out, grad, xc, STEP, EPS, backend=backend),
            "copy": lambda: dst.copy_(xa),
        },
        _rounds(30),
    )
    nbytes = N_GPU * xa.element_size()
    bw_pgd = 4 * nbytes / med["pgd_step"] / 1e9
    bw_copy = 2 * nbytes / med["copy"] / 1e9
    fraction = bw_pgd / bw_copy
    benchmark.extra_info.update(
        n=N_GPU,
        dtype=str(dtype),
        backend=backend,
        device=torch.cuda.get_device_name(),
        pgd_step_ms=med["pgd_step"] * 1e3,
        copy_ms=med["copy"] * 1e3,
        pgd_step_gb_per_s=bw_pgd,
        copy_gb_per_s=bw_copy,
        fraction_of_copy=fraction,
        target=0.85,
        target_pass=fraction >= 0.85,
    )
    print(
        f"\npgd_step {backend} {dtype} n={N_GPU}: {bw_pgd:.0f} GB/s vs copy {bw_copy:.0f} GB/s "
        f"= {fraction:.1%} (target 85%)"
    )
    print(
        f"\nTARGET pgd_step cuda {str(dtype).removeprefix('torch.')} {backend}: {fraction:.1%} of copy "
        f"bandwidth (>= 85%) {'PASS' if fraction >= 0.85 else 'FAIL'}"
    )

    def run():
        pgd_step(out, grad, xc, STEP, EPS, backend=backend)
        sync()

    benchmark.pedantic(run, rounds=_rounds(30), warmup_rounds=2)
    if os.environ.get("CBD_BENCH_ASSERT", "") not in ("", "0"):
        assert fraction >= 0.85, f"pgd_step {backend} {dtype}: {fraction:.1%} of copy bandwidth < 85%"
