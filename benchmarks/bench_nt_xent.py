"""Benchmarks of the fused NT-Xent op per backend against the eager and compiled reference.

Two kinds of test, each writing pytest-benchmark JSON (``--benchmark-json``):

- ``test_nt_xent[provider-mode-case]``: pytest-benchmark times one provider on one case; the
  peak extra memory of one call is in ``extra_info["peak_extra_mib"]`` (CUDA: the allocator's
  peak; CPU: the process's peak RSS above its RSS before the call, reset through
  /proc/self/clear_refs, so approximate).
- ``test_ratio[mode-case]``: all providers of a case timed interleaved in the same run
  (alternating rounds, medians); ``extra_info`` holds every median and the ratio eager / provider.
  This is the number to quote (performance claims are ratios measured side by side).

Providers: ``eager`` (``cbd_fast.ops.reference.nt_xent_reference``, the 2N x 2N matrix),
``compiled`` (the same under ``torch.compile``), ``cpp``, ``triton``, ``cuda`` (those available).
Modes: ``fwd`` (no autograd) and ``fwdbwd`` (both views require grad, ``backward()``).

Cases: 2N in {512, 2048, 8192, 32768} x D in {128, 512, 2048} where affordable. CPU default: the
target case 2N=4096, D=128 float32 plus a few small ones (2N=256: ``purify``'s default batch);
``CBD_BENCH_FULL=1`` adds the larger CPU cases (on CUDA: 2N=1024 D=128 and 2N=32768 D=128
bfloat16, 2N=4096 D=256 float32, 2N=8192 D=2048 bfloat16); ``CBD_BENCH_QUICK=1`` keeps two tiny
cases and 2 rounds (CI smoke run);
``CBD_BENCH_PROVIDERS=eager,cpp`` restricts the providers; ``CBD_BENCH_ROUNDS`` sets the rounds;
``CBD_BENCH_THREADS=1`` sets torch's (and the cpp kernel's) CPU threads.
CUDA: 2N=8192, D=512 bfloat16 (target: fwd+bwd >= 2x eager) and 2N=131072, D=512 bfloat16 without eager (its
score matrix alone would take 64 GiB). ``compiled`` is left out of QUICK runs (compile time).

Targets (``TARGETS``): ``test_ratio`` records, for each fused provider of a target case,
``extra_info["targets"][provider] = {"speedup": x, "min": target, "pass": bool}`` and prints one
``TARGET ... PASS|FAIL`` line per provider (``benchmarks/run_gpu_check.py`` collects them);
``CBD_BENCH_ASSERT=1`` also fails the test when a provider misses its target.

Run::

    python -m pytest benchmarks/bench_nt_xent.py -p no:cacheprovider -s \
        --benchmark-json=benchmarks/results/nt_xent_cpu.json
    # only the side-by-side ratio at the CPU target
    python -m pytest benchmarks/bench_nt_xent.py -p no:cacheprovider -s -k "ratio and 4096"
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from cbd_fast.ops import nt_xent
from cbd_fast.ops.backends import backend_status
from cbd_fast.ops.reference import nt_xent_reference

QUICK = os.environ.get("CBD_BENCH_QUICK", "") not in ("", "0")
FULL = os.environ.get("CBD_BENCH_FULL", "") not in ("", "0")
CUDA = torch.cuda.is_available()
TAU = 0.5

# (2N, D, dtype, providers allowed) per device
if CUDA:
    CASES = [(8192, 512, torch.bfloat16, None), (131072, 512, torch.bfloat16, ("triton", "cuda"))]
    if QUICK:
        CASES = [(2048, 128, torch.bfloat16, None)]
    elif FULL:  # where each backend wins: CBD-sized batches, wide features, float32, a long batch
        CASES += [
            (1024, 128, torch.bfloat16, None),
            (4096, 256, torch.float32, None),
            (8192, 2048, torch.bfloat16, None),
            (32768, 128, torch.bfloat16, None),
        ]
elif QUICK:
    CASES = [(512, 128, torch.float32, None), (1024, 64, torch.float32, None)]
else:
    CASES = [
        (256, 128, torch.float32, None),  # purify's default batch (128 images and their anchors)
        (512, 128, torch.float32, None),
        (2048, 128, torch.float32, None),
        (4096, 128, torch.float32, None),  # the CPU target: cpp fwd+bwd >= 1.5x eager
        (2048, 512, torch.float32, None),
    ]
    if FULL:
        CASES += [
            (8192, 128, torch.float32, None),
            (2048, 2048, torch.float32, None),
            (8192, 512, torch.float32, ("eager", "cpp")),
            (32768, 128, torch.float32, ("cpp",)),
        ]

DEVICE = "cuda" if CUDA else "cpu"
#: (device, mode, 2N, D, dtype) -> minimal speedup of a fused provider over eager
TARGETS = {
    ("cuda", "fwdbwd", 8192, 512, torch.bfloat16): 2.0,
    ("cpu", "fwdbwd", 4096, 128, torch.float32): 1.5,
}
ASSERT_TARGETS = os.environ.get("CBD_BENCH_ASSERT", "") not in ("", "0")
if os.environ.get("CBD_BENCH_THREADS"):  # e.g. 1: a single-thread comparison, less hurt by a busy machine
    torch.set_num_threads(int(os.environ["CBD_BENCH_THREADS"]))
MODES = ("fwd", "fwdbwd")


def _rounds() -> int:
    return 2 if QUICK else int(os.environ.get("CBD_BENCH_ROUNDS", 30 if CUDA else 5))


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


_compiled_ref: Callable | None = None


def _providers(allowed: tuple[str, ...] | None) -> list[str]:
    status = backend_status(DEVICE)
    names = ["eager"] if QUICK else ["eager", "compiled"]  # QUICK: no compilation time in CI
    names += [b for b in ("cpp", "triton", "cuda") if status[b] is None and not (b == "triton" and not CUDA)]
    only = [p for p in os.environ.get("CBD_BENCH_PROVIDERS", "").split(",") if p]
    return [p for p in names if (allowed is None or p in allowed) and (not only or p in only)]


def _loss_fn(provider: str) -> Callable:
    global _compiled_ref
    if provider == "eager":
        return nt_xent_reference
    if provider == "compiled":
        if _compiled_ref is None:
            _compiled_ref = torch.compile(nt_xent_reference, dynamic=False)
        return _compiled_ref
    return lambda a, b, tau: nt_xent(a, b, tau, backend=provider)


def _make_call(provider: str, mode: str, two_n: int, d: int, dtype: torch.dtype) -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    n = two_n // 2
    a = torch.randn(n, d, generator=g).to(device=DEVICE, dtype=dtype)
    b = torch.randn(n, d, generator=g).to(device=DEVICE, dtype=dtype)
    fn = _loss_fn(provider)
    if mode == "fwd":

        def call() -> object:
            with torch.no_grad():
                return fn(a, b, TAU)

        return call
    a.requires_grad_(True)
    b.requires_grad_(True)

    def call() -> object:
        a.grad = b.grad = None
        loss = fn(a, b, TAU)
        loss.backward()
        return loss

    return call


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def peak_extra_mib(call: Callable[[], object]) -> float:
    """Peak memory of one call above what was allocated before it, in MiB (see module doc)."""
    if CUDA:
        _sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        _sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return float("nan")
    base = _rss_kib("VmRSS")
    call()
    return (_rss_kib("VmHWM") - base) / 1024


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds after one warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    _sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _case_id(case: tuple) -> str:
    two_n, d, dtype, _ = case
    return f"2N{two_n}-D{d}-{str(dtype).removeprefix('torch.')}"


_PARAMS = [
    pytest.param(p, m, c, id=f"{p}-{m}-{_case_id(c)}") for c in CASES for m in MODES for p in _providers(c[3])
]


@pytest.mark.parametrize("provider,mode,case", _PARAMS)
def test_nt_xent(benchmark, provider: str, mode: str, case: tuple) -> None:
    two_n, d, dtype, _ = case
    call = _make_call(provider, mode, two_n, d, dtype)
    call()  # warm-up (and compilation)
    benchmark.extra_info.update(
        {"provider": provider, "mode": mode, "2N": two_n, "D": d, "dtype": str(dtype), "device": DEVICE}
    )
    benchmark.extra_info["peak_extra_mib"] = round(peak_extra_mib(call), 1)

    def timed() -> None:
        call()
        _sync()

    benchmark.pedantic(timed, rounds=_rounds(), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ratio(benchmark, mode: str, case: tuple) -> None:
    """Every available provider of a case, interleaved; ratios eager / provider in extra_info."""
    two_n, d, dtype, allowed = case
    names = _providers(allowed)
    fns = {p: _make_call(p, mode, two_n, d, dtype) for p in names}
    meds = interleaved_medians(fns, _rounds())
    info = {"mode": mode, "2N": two_n, "D": d, "dtype": str(dtype), "device": DEVICE}
    info.update({f"median_ms_{p}": round(t * 1e3, 3) for p, t in meds.items()})
    if "eager" in meds:
        info.update(
            {f"speedup_vs_eager_{p}": round(meds["eager"] / t, 3) for p, t in meds.items() if p != "eager"}
        )
    target = TARGETS.get((DEVICE, mode, two_n, d, dtype))
    missed = []
    if target is not None and "eager" in meds:
        info["targets"] = {}
        for p in (p for p in meds if p in ("cpp", "triton", "cuda")):
            speedup = meds["eager"] / meds[p]
            ok = speedup >= target
            info["targets"][p] = {"speedup": round(speedup, 3), "min": target, "pass": ok}
            print(
                f"\nTARGET nt_xent {DEVICE} {mode} 2N={two_n} D={d} {str(dtype).removeprefix('torch.')} "
                f"{p}: {speedup:.2f}x eager (>= {target}x) {'PASS' if ok else 'FAIL'}"
            )
            if not ok:
                missed.append(f"{p} {speedup:.2f}x < {target}x")
    benchmark.extra_info.update(info)
    print(
        f"\n[nt_xent {DEVICE} {mode} 2N={two_n} D={d} {dtype}] "
        + ", ".join(f"{k}={v}" for k, v in info.items())
    )
    fast = next((p for p in ("cuda", "triton", "cpp") if p in fns), names[-1])
    benchmark.pedantic(fns[fast], rounds=1, iterations=1, warmup_rounds=0)
    if ASSERT_TARGETS:
        assert not missed, f"target missed: {missed}"
