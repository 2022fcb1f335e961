"""Streaming memory: ``purify`` streams data through a DataLoader a batch at a time and never
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
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cbd_fast

BATCH = 4
SHAPE = (1, 6, 6)
# health="off": the health check holds out a fixed number of images (at most health_images, 256 by
# default, whatever the data size) and measures them as one batch; that bounded set is not streamed
# data, and test_health_set_is_bounded checks it separately. reference_cache=False: the cache is one
# [N, D] table of features by design (test_reference_cache_is_the_one_table checks it).
FAST = {
    "epochs": 1,
    "batch_size": BATCH,
    "steps": 1,
    "progress": False,
    "log_every": 1000,
    "health": "off",
    "reference_cache": False,
}


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
    """Records the largest NEW tensor (bytes) that any op outputs, and how many ops ran.

    Outputs that share storage with an input (views such as slices, in-place results) are not
    allocations and are skipped; so are integer index tensors (the sampler's permutation of the N
    sample indices is O(N) by nature, 8 bytes per sample, not a copy of the images).
    """

    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 0
        self.max_op = ""
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.device.type != "meta"
                and t.dtype not in (torch.int64, torch.int32)
                and t.untyped_storage().data_ptr() not in inputs
            ):
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
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 8))


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


@pytest.mark.slow
def test_reference_cache_is_the_one_table() -> None:
    """With the reference cache on, the one allocation that grows with the data is the [N, D]
    float32 table of the original's features (D = 8 floats per image here against 36 pixels; on
    real backbones a few % of an image), allocated once: no [N, ...] temporary beside it."""
    n, d = 100 * BATCH, 8
    large = _largest_tensor(LazyImages(n), reference_cache=True)
    assert large.max_bytes == n * d * 4, large.max_op
    assert large.max_bytes < _nbytes(n) / 4


@pytest.mark.slow
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
    import json, os, sys, threading, time
    import torch
    torch.set_num_threads(1)
    from torch import nn
    import cbd_fast
    from tests.core.test_memory import LazyImages

    n, mode = int(sys.argv[1]), sys.argv[2]
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten())
    # adversary="pgd": a universal adversary's first batch (a patch scan) makes a fixed ~20 MB one-time
    # allocation in its first real run (not data-proportional: 19.6 MB at 10 batches, 20.9 MB at 100)
    # that varies by a few MB between runs; the tensor-size tests above cover the defaults.
    kw = dict(
        epochs=1, batch_size=16, steps=1, progress=False, clean_term="none", adversary="pgd", health="off",
        reference_cache=False,
    )
    cbd_fast.purify(enc, LazyImages(32, (3, 32, 32)), **kw)  # warm-up: allocator pools, lazy imports
    base, peak, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    data = LazyImages(n, (3, 32, 32))
    if mode == "materialised":  # the control: what holding the whole dataset costs
        data = torch.stack([data[i][0] for i in range(n)])
    cbd_fast.purify(enc, data, **kw)
    stop.set()
    t.join()
    print(json.dumps({"growth_bytes": peak[0] - base}))
    """
)


def _peak_rss_growth_kib(n: int, mode: str = "lazy") -> float:
    """Peak resident-set growth (KiB) of a purify run over ``n`` 3x32x32 images, sampled every 2 ms."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_WORKER, str(n), mode],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_bytes"] / 1024


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc/self/statm")
def test_peak_rss_is_flat_for_a_dataset_100x_one_batch() -> None:
    """100 batches of 3x32x32 float images (19.2 MiB if materialised) vs 10 batches; a control run
    that does materialise the 100 batches shows the instrument would see it."""
    dataset_kib = 100 * 16 * 3 * 32 * 32 * 4 / 1024
    small = _peak_rss_growth_kib(10 * 16)
    large = _peak_rss_growth_kib(100 * 16)
    control = _peak_rss_growth_kib(100 * 16, "materialised")
    print(
        f"peak RSS growth: {large:.0f} KiB (100 batches), {small:.0f} KiB (10 batches), "
        f"{control:.0f} KiB (100 batches materialised); dataset {dataset_kib:.0f} KiB"
    )
    assert control > 0.9 * dataset_kib  # the instrument sees a materialised dataset
    assert large - small < dataset_kib / 4, f"peak RSS growth {large} KiB (100 batches) vs {small} KiB (10)"


def test_health_set_is_bounded() -> None:
    """The held-out health images are at most ``health_images``, whatever the data size."""
    from cbd_fast.core.inputs import holdout_split

    for n in (320, 3_000, 1_000_000):
        held, train = holdout_split(n, 256, seed=0)
        assert len(held) <= 256 and len(held) + len(train) == n
