"""cbd_fast.evaluation.fmnist: the Fashion-MNIST IDX loader against known facts of the dataset."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from cbd_fast.evaluation.fmnist import DEFAULT_ROOT, load_fashion_mnist, read_idx, split_unlabeled

HAVE_FMNIST = (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install -y dataset-fashion-mnist")


def _write_idx(path, arr: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(">u1").tobytes())


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


def test_synthetic_root(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    labs = np.array([0, 1, 2, 3, 9], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labs)
    ds = load_fashion_mnist("test", root=tmp_path)
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.float32
    assert torch.equal(ds.labels, torch.tensor([0, 1, 2, 3, 9]))
    assert torch.allclose(ds.images[:, 0] * 255, torch.from_numpy(imgs).float())
    u8 = load_fashion_mnist("test", root=tmp_path, as_uint8=True)
    assert u8.images.dtype == torch.uint8


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


@pytest.mark.parametrize("split", ["valid", ""])
def test_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(split)


@needs_fmnist
def test_known_facts_test_split():
    ds = load_fashion_mnist("test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    # Fashion-MNIST is balanced: 1,000 test images per class.
    assert ds.labels.bincount().tolist() == [1000] * 10


@needs_fmnist
def test_known_facts_train_split():
    ds = load_fashion_mnist("train")
    assert len(ds) == 60000
    assert ds.labels.bincount().tolist() == [6000] * 10
    # The first training image is an ankle boot (class 9), the second a T-shirt/top (class 0).
    assert ds.labels[:2].tolist() == [9, 0]


@needs_fmnist
def test_split_unlabeled_five_percent():
    ds = load_fashion_mnist("train")
    x, idx = split_unlabeled(ds, 0.05, seed=3)
    assert x.shape == (3000, 1, 28, 28) and idx.unique().numel() == 3000
    assert torch.equal(x, ds.images[idx])
    x2, idx2 = split_unlabeled(ds, 0.05, seed=3)
    assert torch.equal(idx, idx2)
    with pytest.raises(ValueError, match="fraction"):
        split_unlabeled(ds, 0.0)
