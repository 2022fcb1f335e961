"""The user's data -> a stream of image batches (with sample indices) for the CBD loop.

Accepted forms (labels, if present, are never read):

* a Tensor ``[N, C, H, W]``: float in [0, 1] or uint8 (scaled by 1/255);
* a ``Dataset`` whose items are an image tensor ``[C, H, W]`` (or a numpy array) or a tuple/list
  whose first element / a dict whose ``"image"`` key is one;
* a ``DataLoader``: used as is (its own order, batch size and workers); its batches are parsed the
  same way (a Tensor, a tuple/list -> first element, a dict -> ``"image"``).

For Tensor and Dataset inputs the stream owns the order: a permutation drawn from (seed, epoch) each
epoch (or the distributed sampler's, sharded over ranks), batches of the per-rank batch size, and the
dataset index of every image, the key of its per-sample random start. A user DataLoader carries no
indices: images are numbered by their position in the epoch's stream (batch offset + row), so random
starts depend on that loader's order; make it reproducible with its own ``generator`` (cbd_fast saves
and restores that generator's state in checkpoints).

Data is streamed: batches are moved to the device one at a time (uint8 is moved as uint8 and scaled
there); the whole dataset never is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler

__all__ = [
    "ImageStream",
    "EpochShuffleSampler",
    "MappedSampler",
    "holdout_split",
    "images_at",
    "extract_images",
    "check_images",
]


class EpochShuffleSampler(Sampler[int]):
    """The one-process sampler: epoch ``e`` yields ``torch.randperm(n)`` from a generator seeded with
    ``seed + e`` (``shuffle=True``), else ``range(n)``.

    That is ``DistributedSampler``'s permutation, so one process sees the same global batches as N
    ranks with the same seed (``cbd_fast.core.distributed.make_sampler``). Call :meth:`set_epoch`
    before iterating; no hidden generator state, so a resumed run sees exactly the order an
    uninterrupted run saw.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class MappedSampler(Sampler[int]):
    """``indices[i]`` for every ``i`` an inner sampler yields: a sampler over a subset of a dataset
    that still hands out the dataset's own indices (the keys of the per-sample randomness)."""

    def __init__(self, inner: Sampler[int], indices: Sequence[int]) -> None:
        self.inner, self.indices = inner, list(indices)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the inner sampler."""
        self.inner.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[int]:
        return (self.indices[i] for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


def holdout_split(n: int, wanted: int, seed: int) -> tuple[list[int], list[int]]:
    """Which of ``n`` images to hold out of training (for the health check) and which to train on.

    At most a tenth of the images, up to ``wanted``, chosen by a permutation seeded with ``seed``;
    nothing is held out when that would be fewer than 32 images.

    Returns:
        (held-out indices, training indices), both sorted.
    """
    k = min(int(wanted), n // 10)
    if k < 32:
        return [], list(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 0x5EED))
    hold = sorted(perm[:k].tolist())
    held = set(hold)
    return hold, [i for i in range(n) if i not in held]


def images_at(data: Any, indices: Sequence[int]) -> torch.Tensor:
    """The images ``data[indices]`` of a Tensor or map-style Dataset, stacked [k, C, H, W] (dtype as
    stored: uint8 stays uint8)."""
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(list(indices), dtype=torch.long, device=data.device)]
    return torch.stack([extract_images(data[i], what=f"dataset item {i}") for i in indices])


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(dtype={x.dtype}, shape={tuple(x.shape)})"
    return type(x).__module__ + "." + type(x).__qualname__


def extract_images(item: Any, *, what: str = "data item") -> torch.Tensor:
    """The image tensor inside one dataset item or one DataLoader batch.

    Args:
        item: a Tensor, a numpy array, a tuple/list (first element taken) or a dict (``"image"`` key).
        what: how to name ``item`` in error messages.

    Returns:
        the image tensor (not copied, not checked: see :func:`check_images`).
    """
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, np.ndarray):
        return torch.from_numpy(item)
    if isinstance(item, (tuple, list)):
        if len(item) == 0:
            raise ValueError(f"{what} is an empty {type(item).__name__}; expected images first")
        return extract_images(item[0], what=f"{what}[0]")
    if isinstance(item, Mapping):
        if "image" not in item:
            raise ValueError(
                f"{what} is a dict without an 'image' key; got keys {sorted(map(str, item.keys()))}"
            )
        return extract_images(item["image"], what=f"{what}['image']")
    hint = " (convert PIL images with a ToTensor-like transform)" if "PIL" in type(item).__module__ else ""
    raise TypeError(
        f"{what} must be an image tensor, or a tuple/list/dict holding one; got {_describe(item)}{hint}"
    )


def check_images(x: torch.Tensor, *, what: str = "images", values: bool = True) -> None:
    """Validate an image batch: [B, C, H, W], uint8 or float, non-empty; float values finite in [0, 1].

    Args:
        x: the batch (any device).
        what: how to name it in error messages.
        values: also check the values (one host sync on an accelerator).

    Raises:
        TypeError: not a tensor, or an integer (other than uint8), bool or complex dtype.
        ValueError: wrong rank, an empty dimension, NaN/Inf, or values outside [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor; got {_describe(x)}")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise TypeError(f"{what} must be float in [0, 1] or uint8 (0..255); got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{what} must be 4-D [N, C, H, W]; got shape {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{what} must be non-empty; got shape {tuple(x.shape)}")
    if values and x.dtype != torch.uint8:
        # Chunked, so a large dataset tensor is checked without a temporary of its size.
        step = max(1, (1 << 22) // max(1, x[0].numel()))
        lo_v, hi_v = math.inf, -math.inf
        for i in range(0, x.shape[0], step):
            chunk = x if step >= x.shape[0] else x[i : i + step]  # (a view)
            lo, hi = torch.aminmax(chunk)
            lo_f, hi_f = float(lo), float(hi)
            if not (math.isfinite(lo_f) and math.isfinite(hi_f)):  # aminmax propagates NaN
                n_bad = int((~torch.isfinite(chunk)).sum())
                last = min(i + step, x.shape[0]) - 1
                raise ValueError(
                    f"{what} contain NaN/Inf value(s) ({n_bad} in images {i}..{last}); "
                    "images must be finite in [0, 1]"
                )
            lo_v, hi_v = min(lo_v, lo_f), max(hi_v, hi_f)
        if lo_v < 0.0 or hi_v > 1.0:
            raise ValueError(
                f"{what} must be in [0, 1]; got min {lo_v:g}, max {hi_v:g}. Standardised images (e.g. "
                "ImageNet mean / std)? Pass the [0, 1] images and set PurifyConfig(input_mean=..., "
                "input_std=...): the encoder then sees them standardised"
            )


class _IndexedDataset(Dataset):
    """Wraps a map-style Dataset: item i -> (i, image tensor) (labels dropped in the worker)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        img = extract_images(self.ds[i], what=f"dataset item {i}")
        if not isinstance(img, torch.Tensor) or img.dim() != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else None
            raise ValueError(f"dataset item {i} must hold a [C, H, W] image; got shape {shape}")
        return i, img


class _TensorBatches(Dataset):
    """A Tensor [N, C, H, W] fetched a whole batch at a time: a list of indices -> (indices, images)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.int64)
        return i, self.images[i.to(self.images.device)]


class ImageStream:
    """Batches of (images on the device, sample indices) for one epoch at a time.

    Args:
        data: a Tensor, Dataset or DataLoader (see the module docstring).
        batch_size: images per batch on this rank (Tensor/Dataset inputs; a DataLoader keeps its own).
        seed: the run seed (data order).
        device: where batches go.
        dtype: float dtype of the images handed out (the encoder's parameter dtype).
        num_workers: DataLoader workers (Tensor/Dataset inputs).
        sampler: a per-sample sampler with ``set_epoch`` (the distributed one); None = this module's
            :class:`EpochShuffleSampler`.

    Construction validates everything that can be checked cheaply: the type, the number of images
    (>= 2), and for a Tensor its dtype, rank and values (on its own device, once).
    """

    def __init__(
        self,
        data: Any,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        num_workers: int = 0,
        sampler: Sampler | None = None,
    ) -> None:
        self.device, self.dtype, self.seed, self.batch_size = device, dtype, seed, batch_size
        self.user_loader: DataLoader | None = None
        self._sampler = sampler
        pin = device.type == "cuda"
        if isinstance(data, DataLoader):
            self.user_loader = data
            self.loader: Any = data
            try:
                self.num_samples: int | None = len(data.dataset)  # type: ignore[arg-type]
            except TypeError:
                self.num_samples = None
        elif isinstance(data, torch.Tensor):
            check_images(data, what="data")
            if data.shape[0] < 2:
                raise ValueError(
                    f"data must hold at least 2 images (NT-Xent needs negatives); got {data.shape[0]}"
                )
            self.num_samples = int(data.shape[0])
            self._sampler = sampler if sampler is not None else EpochShuffleSampler(self.num_samples, seed)
            batches = BatchSampler(self._sampler, batch_size, drop_last=False)
            self.loader = DataLoader(
                _TensorBatches(data),
                sampler=batches,
                batch_size=None,
                num_workers=num_workers,
                pin_memory=pin and data.device.type == "cpu",
            )
        elif isinstance(data, IterableDataset):
            raise TypeError(
                "data is an IterableDataset: wrap it in a DataLoader yourself (cbd_fast then uses it as is)"
            )
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            if isinstance(data, (str, bytes, Mapping)):
                raise TypeError(f"data must be a Tensor, Dataset or DataLoader; got {_describe(data)}")
            n = len(data)
            if n < 2:
                raise ValueError(f"data must hold at least 2 images (NT-Xent needs negatives); got {n}")
            self.num_samples = n
            first = extract_images(data[0], what="dataset item 0")
            check_images(first.unsqueeze(0) if first.dim() == 3 else first, what="dataset item 0")
            self._sampler = sampler if sampler is not None else EpochShuffleSampler(n, seed)
            self.loader = DataLoader(
                _IndexedDataset(data),
                batch_sampler=BatchSampler(self._sampler, batch_size, drop_last=False),
                num_workers=num_workers,
                pin_memory=pin,
            )
        else:
            raise TypeError(
                f"data must be a Tensor [N, C, H, W], a Dataset or a DataLoader; got {_describe(data)}"
            )
        if self.user_loader is not None and self.num_samples is not None and self.num_samples < 2:
            raise ValueError(
                f"data must hold at least 2 images (NT-Xent needs negatives); got {self.num_samples}"
            )

    def __len__(self) -> int:
        """Batches per epoch (TypeError when a user DataLoader has no length)."""
        return len(self.loader)

    def batches_per_epoch(self) -> int | None:
        """Batches per epoch, or None when unknown."""
        try:
            return len(self.loader)
        except TypeError:
            return None

    # ------------------------------------------------------------------ RNG state of a user loader
    def generator_states(self) -> dict[str, torch.Tensor]:
        """States of the torch.Generators a user DataLoader carries (loader and sampler), for checkpoints."""
        out = {}
        if self.user_loader is not None:
            for name, g in self._user_generators():
                out[name] = g.get_state()
        return out

    def set_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`generator_states` returned."""
        for name, g in self._user_generators():
            if name in states:
                g.set_state(states[name])

    def _user_generators(self) -> list[tuple[str, torch.Generator]]:
        found = []
        ld = self.user_loader
        if ld is None:
            return found
        for name, obj in (("loader", ld), ("sampler", ld.sampler), ("batch_sampler", ld.batch_sampler)):
            g = getattr(obj, "generator", None)
            if isinstance(g, torch.Generator):
                found.append((name, g))
        inner = getattr(ld.batch_sampler, "sampler", None)
        g = getattr(inner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for _, h in found):
            found.append(("batch_sampler.sampler", g))
        return found

    # ------------------------------------------------------------------ iteration
    def first_batch(self) -> torch.Tensor:
        """The first batch of epoch 0, fully validated (on the host side), as given (not moved)."""
        self.set_epoch(0)
        it = iter(self.loader)
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError("data yielded no batch") from None
        finally:
            del it
        images = self._parse(batch, 0)[1]
        check_images(images, what="data batch 0")
        return images

    def set_epoch(self, epoch: int) -> None:
        for s in (self._sampler, getattr(self.loader, "sampler", None)):
            if s is not None and hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    def _parse(self, batch: Any, position: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.user_loader is None:
            idx, images = batch
            return torch.as_tensor(idx, dtype=torch.int64), images
        return None, extract_images(batch, what="DataLoader batch")

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """The images of sample ``indices`` of a Tensor or Dataset input, as :meth:`epoch` hands them
        out: [k, C, H, W] ``self.dtype`` in [0, 1] on ``self.device``.

        Raises:
            TypeError: for a user DataLoader (its images have no sample index).
        """
        if self.user_loader is not None:
            raise TypeError("a DataLoader input has no images by sample index")
        ds = self.loader.dataset
        if isinstance(ds, _TensorBatches):
            images = ds[list(indices)][1]
        else:
            images = torch.stack([ds[int(i)][1] for i in indices])
        x = images.to(self.device)
        return x.to(self.dtype).div_(255.0) if x.dtype == torch.uint8 else x.to(self.dtype)

    def epoch(self, epoch: int, *, check: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, indices)`` for one epoch.

        Args:
            epoch: 0-based epoch (selects the order).
            check: validate each batch (dtype/rank always; values on the host for CPU runs).

        Yields:
            images: [B, C, H, W] ``self.dtype`` in [0, 1] on ``self.device`` (uint8 scaled on the device).
            indices: [B] int64 sample indices on ``self.device`` (stream positions for a user loader).
        """
        self.set_epoch(epoch)
        position = 0
        for b, batch in enumerate(self.loader):
            idx, images = self._parse(batch, position)
            if check:
                check_images(
                    images, what=f"data batch {b} of epoch {epoch + 1}", values=self.device.type == "cpu"
                )
            n = images.shape[0]
            if idx is None:
                idx = torch.arange(position, position + n, dtype=torch.int64)
            position += n
            nb = self.device.type == "cuda"
            x = images.to(self.device, non_blocking=nb)
            x = x.to(self.dtype).div_(255.0) if x.dtype == torch.uint8 else x.to(self.dtype)
            yield x, idx.to(self.device, non_blocking=nb)
