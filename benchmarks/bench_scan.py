"""Benchmark of the default adversary's mask scan: successive halving against the full scan.

The trigger search starts its mask family from a scan of pasted squares on the first batch
(``cbd_fast/core/adversaries/search.py``, ``TriggerSearch._scan``). ``scan_keep=1`` scores every
square on every scan image (~38 thousand image forwards on 28 x 28 inputs with the default fills,
~27 thousand with the fixed fills alone, whatever the data size); the default ``scan_keep=0.25``
scores them by successive halving. Each case first records whether the two choose the same initial
masks (``same_choice``), then times one scan
of each, interleaved in the same run (alternating rounds, medians), and stores the ratio, the image
forwards of each (and of them those that raise the squares' own-pattern fills, ``scan_ascent``, the
same in both) and the choice in ``extra_info``.

Cases: ``fmnist_cnn`` (28 x 28, the demo's backbone); ``resnet18`` (32 x 32, CIFAR stem) with
``CBD_BENCH_FULL=1`` (a full scan is minutes on one CPU thread). Random weights and random images
(cost only: whether halving keeps the removal is measured on the dev attacks, ``docs/method.md``
4.19).

Run::

    CBD_BENCH_THREADS=1 python -m pytest benchmarks/bench_scan.py -p no:cacheprovider -s \
        --benchmark-json=benchmarks/results/scan_cpu.json

Environment: ``CBD_BENCH_ROUNDS`` (interleaved rounds per side, default 3), ``CBD_BENCH_QUICK=1``
(one round), ``CBD_BENCH_FULL=1`` (adds ``resnet18``), ``CBD_BENCH_THREADS``.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from models import ENCODERS, build_encoder
from torch import nn

from cbd_fast import PurifyConfig
from cbd_fast.core.adversaries import AttackInputs, TriggerSearch

QUICK = os.environ.get("CBD_BENCH_QUICK", "") not in ("", "0")
FULL = os.environ.get("CBD_BENCH_FULL", "") not in ("", "0")
if os.environ.get("CBD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CBD_BENCH_THREADS"]))
BATCH = 128
CASES = ["fmnist_cnn"] + (["resnet18"] if FULL else [])


class _Counting(nn.Module):
    """The encoder, counting the images it is given, and of them those forwarded for a gradient (the
    own-pattern fills' ascent, ``scan_ascent``: the same in both scans)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.images, self.with_grad = encoder, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            self.with_grad += x.shape[0]
        return self.encoder(x)


def _scan(encoder: nn.Module, x: torch.Tensor, keep: float) -> tuple[list[torch.Tensor], int, int]:
    """One scan with ``scan_keep=keep`` (the other settings: the defaults): (the initial mask and
    pattern tensors, image forwards, of them those of the fills' ascent)."""
    cfg = PurifyConfig(adversary_options={"scan_keep": keep}, seed=0).validate()
    counted = _Counting(encoder)
    with torch.no_grad():
        anchors = encoder(x).flatten(1).float()
    counted.images = 0
    inputs = AttackInputs(counted, x, anchors, torch.arange(x.shape[0]), 0, None, cfg)
    with torch.no_grad():
        chosen = TriggerSearch(cfg)._scan(inputs)
    return [t for pair in chosen for t in pair], counted.images, counted.with_grad


@pytest.mark.parametrize("name", CASES)
def test_scan_halving_vs_full(benchmark, name: str) -> None:
    spec = ENCODERS[name]
    encoder = build_encoder(name, seed=0, prefer_library=False).eval()
    x = torch.rand(BATCH, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    full_masks, full_n, full_fill = _scan(encoder, x, 1.0)
    half_masks, half_n, half_fill = _scan(encoder, x, 0.25)
    pairs = list(zip(full_masks, half_masks))
    same = len(full_masks) == len(half_masks) and all(torch.equal(a, b) for a, b in pairs)
    rounds = 1 if QUICK else int(os.environ.get("CBD_BENCH_ROUNDS", 3))
    times: dict[str, list[float]] = {"full": [], "halving": []}
    for _ in range(rounds):
        for label, keep in (("full", 1.0), ("halving", 0.25)):
            t0 = time.perf_counter()
            _scan(encoder, x, keep)
            times[label].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med["full"] / med["halving"]
    benchmark.extra_info.update(
        encoder=name,
        input_shape=list(spec.input_shape),
        batch=BATCH,
        threads=torch.get_num_threads(),
        full_median_s=med["full"],
        halving_median_s=med["halving"],
        speedup=speedup,
        full_image_forwards=full_n,
        halving_image_forwards=half_n,
        fill_ascent_image_forwards={"full": full_fill, "halving": half_fill},
        same_choice=same,
        rounds_s=times,
    )
    print(
        f"\nmask scan {name} {tuple(spec.input_shape)}: full {med['full']:.2f} s ({full_n} image forwards), "
        f"halving {med['halving']:.2f} s ({half_n}), speedup {speedup:.2f}x, same choice {same}; "
        f"of the forwards, {half_fill} raise the own-pattern fills (with a backward) in both"
    )
    benchmark.pedantic(lambda: _scan(encoder, x, 0.25), rounds=1, warmup_rounds=0)
