"""Reading the images users bring: folders of PNG/JPEG, ``.npy``/``.pt`` tensor files, Fashion-MNIST.

Everything ends as :class:`ImageData`: ``images`` [N, C, H, W] (uint8 in [0, 255] for image
folders and uint8 files, which ``cbd_fast.purify`` scales by 1/255; float32 in [0, 1] for float
files) and, when the source carries them, ``labels`` [N] int64 (labels are only ever used to
evaluate).

Image folders are read recursively (sorted paths, so the order is reproducible). The size is
``image_size`` when given, else the model's expected size when it is knowable, else the first
image's; with ``image_size``/the model's size every image is resized (shorter side) and centre-cropped;
without one, images of different sizes are an error naming two of them. Folder labels follow the
ImageFolder convention when every image sits in a first-level subfolder (class = sorted subfolder
index); otherwise there are none.

Example:
    >>> data = load_images("unlabeled/", image_size=32, limit=3000)  # doctest: +SKIP
    >>> data.images.shape, data.images.dtype                           # doctest: +SKIP
    (torch.Size([3000, 3, 32, 32]), torch.uint8)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cbd_fast.core.progress import progress

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageData",
    "load_images",
    "load_labels",
    "load_dataset",
    "subset",
    "resize_center_crop",
    "parse_image_size",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TENSOR_SUFFIXES = (".npy", ".npz", ".pt", ".pth")
DATASETS = ("fashion-mnist",)


@dataclass
class ImageData:
    """Images (and labels, when the source has them) ready for purification or evaluation.

    Attributes:
        images: [N, C, H, W] uint8 in [0, 255] or float32 in [0, 1], on the CPU.
        labels: [N] int64 class indices, or None.
        source: where they came from (a path or ``"fashion-mnist:train"``).
        files: the image files in order (image folders only).
        classes: class names (ImageFolder-style folders only).
        notes: remarks made while loading (resizing, channel conversion, subsetting).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    source: str = ""
    files: list[str] | None = None
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def float_images(self) -> torch.Tensor:
        """The images as float32 in [0, 1] ([N, C, H, W]; uint8 is divided by 255)."""
        if self.images.dtype == torch.uint8:
            return self.images.to(torch.float32).div_(255.0)
        return self.images.to(torch.float32)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: source, count, shape, dtype, whether labelled, notes."""
        return {
            "source": self.source,
            "count": len(self),
            "shape": list(self.images.shape[1:]),
            "dtype": str(self.images.dtype).replace("torch.", ""),
            "labels": self.labels is not None,
            "notes": list(self.notes),
        }


def parse_image_size(value: int | str | Sequence[int] | None) -> tuple[int, int] | None:
    """``32`` / ``"32"`` / ``"32x48"`` / ``(32, 48)`` -> ``(H, W)``; None stays None.

    Raises:
        ValueError: anything else, or a non-positive size.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"image_size must be an int, 'HxW' or (H, W); got {value!r}")
    if isinstance(value, int):
        size = (value, value)
    elif isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"image_size must be an int, 'HxW' or (H, W); got {value!r}") from None
        if len(nums) not in (1, 2):
            raise ValueError(f"image_size must be an int, 'HxW' or (H, W); got {value!r}")
        size = (nums[0], nums[-1])
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        size = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"image_size must be an int, 'HxW' or (H, W); got {value!r}")
    if min(size) <= 0:
        raise ValueError(f"image_size must be positive; got {value!r}")
    return size


def resize_center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize so the image covers ``size`` (aspect kept), then crop the centre to exactly ``size``.

    Args:
        images: [N, C, H, W] uint8 or float.
        size: target ``(H, W)``.

    Returns:
        [N, C, size[0], size[1]] of the input dtype (uint8 rounded and clamped).
    """
    n, c, h, w = images.shape
    th, tw = size
    if (h, w) == (th, tw):
        return images
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = images.to(torch.float32)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - th) // 2, (nw - tw) // 2
    x = x[:, :, top : top + th, left : left + tw]
    if images.dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.clamp_(0.0, 1.0).to(images.dtype) if images.is_floating_point() else x


def _pil_channels(mode: str) -> int:
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "F", "P;L") else 3


def _find_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _read_folder(
    folder: Path,
    size: tuple[int, int] | None,
    channels: int | None,
    limit_to: Sequence[int] | None,
    show_progress: bool,
) -> ImageData:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is in the io extra
        raise ImportError("reading image folders needs Pillow (pip install pillow)") from exc
    files = _find_images(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(folder)!r}")
    all_files = files
    if limit_to is not None:
        files = [files[i] for i in limit_to]
    notes: list[str] = []
    mode = None
    if channels is not None:
        mode = "L" if channels == 1 else "RGB"
    first_size: tuple[int, int] | None = None
    first_file: Path | None = None
    arrays: list[np.ndarray] = []
    resized = 0
    for path in progress(files, desc="loading images", unit="img", disable=not show_progress):
        try:
            with Image.open(path) as im:
                im.load()
                if mode is None:
                    mode = "L" if _pil_channels(im.mode) == 1 else "RGB"
                im = im.convert(mode)
                if size is None:
                    if first_size is None:
                        first_size, first_file = (im.height, im.width), path
                    elif (im.height, im.width) != first_size:
                        raise ValueError(
                            f"images have different sizes: {first_file} is {first_size[1]}x{first_size[0]}, "
                            f"{path} is {im.width}x{im.height}; pass --image-size to resize them"
                        )
                    arr = np.asarray(im, dtype=np.uint8)
                else:
                    th, tw = size
                    if (im.height, im.width) != (th, tw):
                        resized += 1
                        scale = max(th / im.height, tw / im.width)
                        nh, nw = max(th, round(im.height * scale)), max(tw, round(im.width * scale))
                        im = im.resize((nw, nh), Image.BILINEAR)
                        top, left = (nh - th) // 2, (nw - tw) // 2
                        im = im.crop((left, top, left + tw, top + th))
                    arr = np.asarray(im, dtype=np.uint8)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(
                f"cannot read image {str(path)!r}: {str(exc).splitlines()[0] if str(exc) else exc}"
            ) from exc
        arrays.append(arr if arr.ndim == 3 else arr[:, :, None])
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if resized:
        notes.append(f"{resized} image(s) resized/centre-cropped to {size[0]}x{size[1]}")  # type: ignore[index]
    labels, classes = _folder_labels(folder, files, all_files)
    return ImageData(
        images=images,
        labels=labels,
        source=str(folder),
        files=[str(f) for f in files],
        classes=classes,
        notes=notes,
    )


def _folder_labels(
    folder: Path, files: list[Path], all_files: list[Path]
) -> tuple[torch.Tensor | None, list[str] | None]:
    rel = [f.relative_to(folder).parts for f in all_files]
    if not rel or any(len(parts) != 2 for parts in rel):
        return None, None
    classes = sorted({parts[0] for parts in rel})
    if len(classes) < 2:
        return None, None
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index[f.relative_to(folder).parts[0]] for f in files], dtype=torch.int64)
    return labels, classes


_IMAGE_KEYS = ("images", "image", "x", "data", "inputs", "X")
_LABEL_KEYS = ("labels", "label", "y", "targets", "target", "Y")


def _from_container(obj: Any, path: Path) -> tuple[Any, Any]:
    """Split a loaded object into (images, labels-or-None)."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj, None
    if (
        isinstance(obj, (tuple, list))
        and 1 <= len(obj) <= 2
        and isinstance(obj[0], (torch.Tensor, np.ndarray))
    ):
        return obj[0], (obj[1] if len(obj) == 2 else None)
    if isinstance(obj, dict) or hasattr(obj, "files"):  # dict, or an npz archive
        keys = list(obj.keys()) if isinstance(obj, dict) else list(obj.files)
        img_key = next((k for k in _IMAGE_KEYS if k in keys), None)
        if img_key is None and len(keys) == 1:
            img_key = keys[0]
        if img_key is None:
            raise ValueError(
                f"{str(path)!r} holds {sorted(map(str, keys))}; expected an image tensor under one of "
                f"{list(_IMAGE_KEYS)}"
            )
        lab_key = next((k for k in _LABEL_KEYS if k in keys), None)
        return obj[img_key], (obj[lab_key] if lab_key is not None else None)
    raise ValueError(f"{str(path)!r} does not hold an image tensor; got a {type(obj).__name__}")


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def _normalise_images(x: torch.Tensor, path: str, channels: int | None, notes: list[str]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{path!r}: images must be a tensor/array; got a {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
            notes.append("images given as [N, H, W, C]: transposed to [N, C, H, W]")
    else:
        raise ValueError(f"{path!r}: images must be [N, C, H, W] or [N, H, W]; got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{path!r} holds no images (shape {list(x.shape)})")
    if x.dtype == torch.uint8:
        pass
    elif x.is_floating_point():
        x = x.to(torch.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{path!r}: images contain NaN or Inf")
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{path!r}: float images must be in [0, 1]; got min {lo:.4g}, max {hi:.4g} "
                "(store uint8 in [0, 255], or divide by 255)"
            )
    else:
        raise TypeError(
            f"{path!r}: images must be uint8 or float; got dtype {str(x.dtype).replace('torch.', '')}"
        )
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
            notes.append("grayscale images repeated to 3 channels for the model")
        else:
            raise ValueError(
                f"{path!r}: images have {x.shape[1]} channel(s) but the model expects {channels}"
            )
    return x.contiguous()


def _read_tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (and labels) of a tensor file, read without running anything in it
    (``cbd_fast.core.safe_load``: ``np.load(allow_pickle=False)`` / ``torch.load(weights_only=True)``
    after the zip and pickle checks)."""
    from cbd_fast.core import safe_load

    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".npz"):
            obj = safe_load.numpy_load(path)
        else:
            obj = safe_load.torch_load_weights(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read tensor file {str(path)!r}: {first}") from exc
    images, labels = _from_container(obj, path)
    return _as_tensor(images), (None if labels is None else _as_tensor(labels))


def _check_labels(labels: Any, n: int, what: str) -> torch.Tensor:
    labels = _as_tensor(labels)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{what}: labels must be a tensor/array; got a {type(labels).__name__}")
    labels = labels.reshape(-1) if labels.dim() == 2 and 1 in labels.shape else labels
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{what}: labels must have shape [{n}] to match the images; got {list(labels.shape)}"
        )
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError(f"{what}: labels must be integers; got float values such as {labels[0].item()}")
    elif labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{what}: labels must be integers; got dtype {labels.dtype}")
    labels = labels.to(torch.int64)
    if n and int(labels.min()) < 0:
        raise ValueError(f"{what}: labels must be >= 0; got {int(labels.min())}")
    return labels


def load_labels(path: str | os.PathLike[str], n: int | None = None) -> torch.Tensor:
    """Read labels from ``.npy``/``.pt`` (a tensor, or a dict with a labels key) or text (one int per line,
    or comma/space separated).

    Args:
        path: the file.
        n: the number of images they must match (None: no check).

    Returns:
        [N] int64.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"labels file not found: {str(p)!r}")
    if p.suffix.lower() in (".npy", ".npz", ".pt", ".pth"):
        from cbd_fast.core import safe_load

        try:
            obj = (
                safe_load.numpy_load(p)
                if p.suffix.lower() in (".npy", ".npz")
                else safe_load.torch_load_weights(p)
            )
        except Exception as exc:
            raise ValueError(f"cannot read labels file {str(p)!r}: {str(exc).splitlines()[0]}") from exc
        if isinstance(obj, dict) or hasattr(obj, "files"):
            keys = list(obj.keys()) if isinstance(obj, dict) else list(obj.files)
            key = next((k for k in _LABEL_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"labels file {str(p)!r} holds {keys}; expected one of {list(_LABEL_KEYS)}")
            obj = obj[key]
    else:
        text = p.read_text().replace(",", " ").split()
        try:
            obj = torch.tensor([int(t) for t in text], dtype=torch.int64)
        except ValueError as exc:
            raise ValueError(f"labels file {str(p)!r} must hold integers: {exc}") from None
    labels = _as_tensor(obj)
    return _check_labels(labels, labels.shape[0] if n is None else n, f"labels file {str(p)!r}")


def _given_labels(labels: str | os.PathLike[str] | torch.Tensor, n: int) -> torch.Tensor:
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        return _check_labels(labels, n, "labels")
    return load_labels(labels, n=n)


def subset(
    n: int, *, limit: int | None = None, fraction: float | None = None, seed: int = 0
) -> torch.Tensor | None:
    """A seeded random subset of ``range(n)`` (sorted), or None for all.

    Args:
        n: the number of items.
        limit: keep this many (capped at ``n``); exclusive with ``fraction``.
        fraction: keep ``round(fraction * n)`` (at least 1), ``0 < fraction <= 1``.
        seed: the permutation's seed (same seed, same subset).

    Returns:
        [M] int64 sorted indices, or None when no subsetting was asked for.
    """
    if limit is not None and fraction is not None:
        raise ValueError("give either limit or fraction, not both")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer; got {limit!r}")
        m = min(limit, n)
    elif fraction is not None:
        if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) <= 1.0):
            raise ValueError(f"fraction must be in (0, 1]; got {fraction!r}")
        m = max(1, round(float(fraction) * n))
    else:
        return None
    if m >= n:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:m].sort().values


def load_dataset(
    name: str,
    *,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> ImageData:
    """A known dataset by name, with labels (``"fashion-mnist"``: :mod:`cbd_fast.evaluation.fmnist`).

    Args:
        name: the dataset (``"fashion-mnist"``).
        split: ``"train"`` or ``"test"``.
        root: the folder holding its files (None: the package's default location).
        limit, fraction, seed: a seeded subset, as in :func:`subset`.

    Returns:
        :class:`ImageData` with uint8 images and labels.
    """
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}; got {name!r}")
    from cbd_fast.evaluation import fmnist as fm

    ds = fm.load_fashion_mnist(split, root, as_uint8=True)
    images, labels = ds.images, ds.labels
    idx = subset(images.shape[0], limit=limit, fraction=fraction, seed=seed)
    notes = []
    if idx is not None:
        images, labels = images[idx], labels[idx]
        notes.append(f"seeded subset (seed {seed}) of {idx.numel()} of {ds.images.shape[0]} images")
    return ImageData(images=images, labels=labels, source=f"{key}:{split}", notes=notes)


def load_images(
    source: str | os.PathLike[str],
    *,
    image_size: int | str | Sequence[int] | None = None,
    expected_size: tuple[int, int] | None = None,
    channels: int | None = None,
    limit: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
    labels: str | os.PathLike[str] | torch.Tensor | None = None,
) -> ImageData:
    """Load images from a folder (PNG/JPEG/BMP/WebP, recursive) or a ``.npy``/``.npz``/``.pt`` file.

    Args:
        source: the folder or file.
        image_size: resize/centre-crop every image to this (``32``, ``"32x48"``, ``(H, W)``).
        expected_size: the model's input ``(H, W)`` when known; used when ``image_size`` is None.
        channels: the channel count the model expects (1 or 3; None: the first image decides for
            folders, the file's own for tensors). Grayscale is repeated to 3 channels when needed.
        limit, fraction, seed: a seeded random subset (see :func:`subset`); for folders only the
            chosen files are decoded.
        show_progress: draw a progress bar while decoding a folder.
        labels: labels for EVERY image of the source, in its order (a file for :func:`load_labels`
            or an [N] tensor), replacing the source's own; the subset is applied to them too.

    Returns:
        :class:`ImageData` ([N, C, H, W] uint8 or float32 in [0, 1]; labels when the source has them).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no images, images of different sizes without a size, unreadable files, tensors
            of the wrong shape/range; each message names the file(s) and values.
    """
    path = Path(source)
    size = parse_image_size(image_size) or expected_size
    if not path.exists():
        raise FileNotFoundError(f"data not found: {str(path)!r}")
    if path.is_dir():
        files_count = len(_find_images(path))
        if files_count == 0:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(path)!r}")
        given = None if labels is None else _given_labels(labels, files_count)
        idx = subset(files_count, limit=limit, fraction=fraction, seed=seed)
        data = _read_folder(path, size, channels, None if idx is None else idx.tolist(), show_progress)
        if idx is not None:
            data.notes.append(f"seeded subset (seed {seed}) of {idx.numel()} of {files_count} images")
        if given is not None:
            data.labels, data.classes = (given if idx is None else given[idx]), None
        return data
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        raise ValueError(
            f"data must be a folder of images or a tensor file; got the single image {str(path)!r}"
        )
    if suffix not in TENSOR_SUFFIXES:
        raise ValueError(
            f"data must be a folder of images or a {'/'.join(TENSOR_SUFFIXES)} file; got {str(path)!r}"
        )
    raw, raw_labels = _read_tensor_file(path)
    notes: list[str] = []
    images = _normalise_images(raw, str(path), channels, notes)
    if labels is not None:
        labels = _given_labels(labels, images.shape[0])
    elif raw_labels is not None:
        labels = _check_labels(raw_labels, images.shape[0], f"{str(path)!r}")
    idx = subset(images.shape[0], limit=limit, fraction=fraction, seed=seed)
    if idx is not None:
        notes.append(f"seeded subset (seed {seed}) of {idx.numel()} of {images.shape[0]} images")
        images = images[idx]
        labels = None if labels is None else labels[idx]
    if size is not None and tuple(images.shape[-2:]) != size:
        notes.append(
            f"images resized/centre-cropped from {images.shape[-2]}x{images.shape[-1]} to {size[0]}x{size[1]}"
        )
        images = resize_center_crop(images, size)
    return ImageData(images=images.contiguous(), labels=labels, source=str(path), notes=notes)
