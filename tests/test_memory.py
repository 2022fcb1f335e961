"""Streaming memory (issue 10): ``purify`` streams data through a DataLoader a batch at a time and never
materialises the whole dataset (on the device, or as a host copy or temporary).

Two instruments:

- a tensor-size watcher (``TorchDispatchMode``): the largest tensor any op creates during ``purify``
  (forward, attack, backward, validation, collation). With a dataset 100x one batch it must equal the
  largest for a dataset 10x smaller (flat), and stay far below the dataset's size;
- peak RSS of a subprocess running ``purify`` on a lazily generated dataset of 100 batches vs one of
  10 batches: the difference must be small next to the 10x larger dataset's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cbd_fast

BATCH = 8
SHAPE = (1, 8, 8)
FAST = {"epochs": 1, "batch_size": BATCH, "steps": 1, "progress": False, "log_every": 1000}


class LazyImages(torch.utils.data.Dataset):
    """``n`` images [C, H, W] in [0, 1], each generated on demand from its index (nothing stored)."""

    def __init__(self, n: int, shape: tuple[int, ...] = SHAPE) -> None:
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(int(i))
        return torch.rand(self.shape, generator=g), int(i) % 10  # (image, label): labels are ignored


class _Watch(TorchDispatchMode):
    """Records the largest tensor (bytes) that any op outputs, and how many ops ran."""

    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 0
        self.max_op = ""
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                nbytes = t.numel() * t.element_size()
                if nbytes > self.max_bytes:
                    self.max_bytes, self.max_op = nbytes, f"{func} -> {tuple(t.shape)} {t.dtype}"
        return out


@contextmanager
def _watching() -> Iterator[_Watch]:
    with _Watch() as watch:
        yield watch


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten())


def _largest_tensor(data: object, **kw: object) -> _Watch:
    with _watching() as watch:
        cbd_fast.purify(_encoder(), data, **{**FAST, **kw})
    return watch


def _nbytes(n: int) -> int:
    return n * torch.Size(SHAPE).numel() * 4


@pytest.mark.slow
def test_lazy_dataset_100_batches_has_flat_peak_tensor_size() -> None:
    small = _largest_tensor(LazyImages(10 * BATCH))
    large = _largest_tensor(LazyImages(100 * BATCH))
    assert large.ops > 5 * small.ops  # the large run really did 10x the work
    assert large.max_bytes == small.max_bytes, (small.max_op, large.max_op)
    assert large.max_bytes < _nbytes(100 * BATCH) / 20, large.max_op  # far below the dataset's size


def _tensor_data(n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)
    return data if dtype == torch.uint8 else data.to(dtype) / 255


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_tensor_data_is_streamed_not_copied(dtype: torch.dtype) -> None:
    """A Tensor dataset (100 batches) is indexed a batch at a time: no whole-dataset copy or
    temporary (a float conversion, a pinned or device copy, validation over all of it at once)."""
    kw = {"steps": 0, "clean_term": "none"}
    small = _largest_tensor(_tensor_data(10 * BATCH, dtype), **kw)
    large = _largest_tensor(_tensor_data(100 * BATCH, dtype), **kw)
    assert large.max_bytes == small.max_bytes, (small.max_op, large.max_op)
    assert large.max_bytes < _nbytes(100 * BATCH) / 5, large.max_op


_RSS_WORKER = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from torch import nn
    import cbd_fast
    from tests.test_memory import LazyImages

    n, c, hw = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(c, 4, 3, stride=2), nn.ReLU(), nn.Flatten())
    # warm-up on 2 batches: allocator pools, kernels, lazy imports
    cbd_fast.purify(enc, LazyImages(32, (c, hw, hw)), epochs=1, batch_size=16, steps=1, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cbd_fast.purify(enc, LazyImages(n, (c, hw, hw)), epochs=1, batch_size=16, steps=1, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))
    """
)


def _peak_rss_growth_kib(n: int, c: int = 3, hw: int = 32) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_WORKER, str(n), str(c), str(hw)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **_env()},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    return rss["after_kib"] - rss["before_kib"]


def _env() -> dict[str, str]:
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_peak_rss_is_flat_for_a_dataset_100x_one_batch() -> None:
    """100 batches of 3x32x32 float images (19.7 MB if materialised) vs 10 batches (2 MB)."""
    image_kib = 3 * 32 * 32 * 4 / 1024
    small = _peak_rss_growth_kib(10 * 16)
    large = _peak_rss_growth_kib(100 * 16)
    dataset_kib = 100 * 16 * image_kib
    # A materialised dataset would add ~19_200 KiB; allow allocator noise well below that.
    assert large - small < dataset_kib / 4, f"peak RSS growth {large} KiB (100 batches) vs {small} KiB (10)"
