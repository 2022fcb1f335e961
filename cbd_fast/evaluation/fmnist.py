"""Fashion-MNIST loader for the IDX files Debian ships (``apt-get install -y dataset-fashion-mnist``).

The four gzip'd IDX files live under ``/usr/share/datasets/fashion-mnist/`` by default. Nothing is
downloaded: the files are read from disk (``root``, or ``CBD_FAST_FMNIST_ROOT``).

Example:
    >>> from cbd_fast.evaluation.fmnist import load_fashion_mnist                 # doctest: +SKIP
    >>> ds = load_fashion_mnist("train")                              # doctest: +SKIP
    >>> ds.images.shape, ds.images.dtype, ds.labels.shape             # doctest: +SKIP
    (torch.Size([60000, 1, 28, 28]), torch.float32, torch.Size([60000]))
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_ROOT",
    "FASHION_MNIST_CLASSES",
    "ImageSet",
    "load_fashion_mnist",
    "read_idx",
    "split_unlabeled",
]

#: Where ``dataset-fashion-mnist`` puts the files; ``CBD_FAST_FMNIST_ROOT`` overrides it.
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes -> numpy dtypes (big-endian as stored).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageSet:
    """A labelled image set.

    Attributes:
        images: [N, 1, 28, 28] float32 in [0, 1] (or uint8 in [0, 255] with ``as_uint8=True``).
        labels: [N] int64 class indices in [0, 10).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | slice) -> ImageSet:
        """Rows ``index`` of both tensors (a new ``ImageSet``; shares storage for slices)."""
        return ImageSet(self.images[index], self.labels[index])


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip'd when its name ends in ``.gz``) into a numpy array.

    Args:
        path: the file.

    Returns:
        An array with the file's dimensions and native-endian dtype (uint8 for the image/label files).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file; got magic bytes {raw[:4]!r}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path} has an unknown IDX type code; got {code:#x}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: dims {dims} need {count * dtype.itemsize} bytes")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found under root={str(root)!r}. Install the Debian "
        "package with `apt-get install -y dataset-fashion-mnist` (files go to "
        f"{DEFAULT_ROOT}), or pass root= the folder that holds the four IDX files."
    )


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    *,
    as_uint8: bool = False,
    limit: int | None = None,
) -> ImageSet:
    """Load a Fashion-MNIST split from the IDX files.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: folder with the four IDX files (gzip'd or not). Default: ``$CBD_FAST_FMNIST_ROOT`` or
            ``/usr/share/datasets/fashion-mnist``.
        as_uint8: return images as uint8 in [0, 255] instead of float32 in [0, 1].
        limit: keep only the first ``limit`` images (``None``: all).

    Returns:
        ``ImageSet`` with ``images`` [N, 1, 28, 28] and ``labels`` [N] int64.

    Raises:
        ValueError: unknown ``split`` or bad ``limit``.
        FileNotFoundError: the files are missing (the message says how to install them).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive int or None; got {limit!r}")
    root_path = Path(root) if root is not None else Path(os.environ.get("CBD_FAST_FMNIST_ROOT", DEFAULT_ROOT))
    img_stem, lab_stem = _FILES[split]
    images = read_idx(_find(root_path, img_stem))
    labels = read_idx(_find(root_path, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"unexpected IDX shapes under {root_path}: images {images.shape}, labels {labels.shape}"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if not as_uint8:
        x = x.to(torch.float32).div_(255.0)
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)))


def split_unlabeled(
    train: ImageSet, fraction: float = 0.05, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``fraction`` of the training images, the first ones of ``randperm(N, seed)``.

    This is the permutation a backdoored model with the same seed was poisoned from, so the draw
    holds exactly the clean copies of the first poisoned images: the held-out protocol uses
    :func:`cbd_fast.evaluation.protocol.defender_images` instead and keeps this draw as its
    ``overlap=True`` ablation.

    Args:
        train: the training set.
        fraction: share of images in (0, 1]; 0.05 gives 3,000 of Fashion-MNIST's 60,000.
        seed: seed of the draw.

    Returns:
        ``(images, index)``: [M, 1, 28, 28] images (labels are NOT returned: the defense never sees
        them; evaluation code may look them up with ``train.labels[index]``) and the [M] int64 index.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    g = torch.Generator().manual_seed(seed)
    m = max(1, round(fraction * len(train)))
    index = torch.randperm(len(train), generator=g)[:m]
    return train.images[index], index
