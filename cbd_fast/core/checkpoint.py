"""Crash-safe checkpoints of a purification run: atomic writes, checksums, the last good one kept.

File layout (``<dir>/purify-epoch0003.ckpt``)::

    b"CBDCKPT1" | 32-byte SHA-256 of the payload | payload (torch.save of a dict)

Writing: the bytes go to a temporary name in the same directory, are flushed and fsynced, renamed
over the final name with ``os.replace`` (atomic on POSIX), and the directory is fsynced. A reader
therefore sees either the old set of files or the new one, never a half-written checkpoint; a file
whose magic or checksum does not match (a torn write on a filesystem without these guarantees, a
truncated copy, bit rot) is never unpickled. The newest ``keep`` checkpoints are kept (default two),
so :func:`load_latest` falls back to the previous good one when the newest is damaged.

Loading uses ``torch.load(weights_only=True)``: a checkpoint holds only tensors, numbers, strings,
lists and dicts.

For the crash tests, ``CBD_FAST_TEST_CKPT_SLEEP=<seconds>`` makes :func:`save_checkpoint` pause after
writing half of the payload (test hook; never set it otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbd_fast.core.files import atomic_output

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest",
    "list_checkpoints",
    "model_fingerprint",
    "checkpoint_path",
]

MAGIC = b"CBDCKPT1"
_DIGEST = 32
_NAME = re.compile(r"^purify-epoch(\d{4,})\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (corrupt, truncated, another model, another format)."""


def checkpoint_path(directory: str | os.PathLike[str], epoch: int) -> Path:
    """The file name of the checkpoint written after ``epoch`` completed epochs."""
    return Path(directory) / f"purify-epoch{epoch:04d}.ckpt"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``[(epoch, path), ...]`` of the checkpoint files in ``directory``, oldest first ([] if none)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def model_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex, 16 chars) of the module's state_dict names, shapes and dtypes: its architecture.

    Args:
        module: any nn.Module; two modules share a fingerprint iff their state_dicts have the same
            keys with the same shapes and dtypes (weights are not part of it).
    """
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def save_checkpoint(
    directory: str | os.PathLike[str], epoch: int, state: dict[str, Any], *, keep: int = 2
) -> Path:
    """Atomically write ``state`` as the checkpoint of ``epoch``; keep the newest ``keep`` files.

    Args:
        directory: the checkpoint directory (created if missing).
        epoch: completed epochs (>= 0); the file is ``purify-epoch{epoch:04d}.ckpt``.
        state: a dict of tensors, numbers, strings, lists, dicts (what ``torch.load(weights_only=True)``
            accepts).
        keep: how many checkpoint files to keep (>= 1); older ones are deleted after the write.

    Returns:
        the path written.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    final = checkpoint_path(d, epoch)
    pause = float(os.environ.get("CBD_FAST_TEST_CKPT_SLEEP", "0") or 0)
    with atomic_output(final) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(hashlib.sha256(payload).digest())
        half = len(payload) // 2
        f.write(payload[:half])
        if pause > 0:  # test hook: a kill now leaves a half-written temporary file
            f.flush()
            time.sleep(pause)
        f.write(payload[half:])
    for _, old in list_checkpoints(d)[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
    for stale in d.glob(".purify-epoch*.ckpt.*"):  # hidden temporary files of killed writers
        with contextlib.suppress(OSError):
            stale.unlink()
    return final


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and verify one checkpoint file.

    Args:
        path: the file.
        map_location: passed to ``torch.load`` (default: everything on the CPU).

    Returns:
        the state dict that was saved.

    Raises:
        CheckpointError: the file is not a cbd_fast checkpoint, is truncated or its checksum does not
            match (the message names the file).
    """
    p = Path(path)
    data = p.read_bytes()
    head = len(MAGIC) + _DIGEST
    if len(data) < head or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{p} is not a cbd_fast checkpoint (bad header; {len(data)} bytes)")
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) : head]:
        raise CheckpointError(f"{p} is corrupt or truncated (checksum mismatch; {len(data)} bytes)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # pragma: no cover - a valid checksum over an unreadable payload
        raise CheckpointError(f"{p} could not be read: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{p} does not hold a checkpoint dict; got {type(state).__name__}")
    return state


def load_latest(
    directory: str | os.PathLike[str], *, map_location: Any = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that verifies, as ``(path, state)``; None when there is none.

    A damaged newer file is skipped with a warning naming it (the previous good one is used); when
    files exist but none verifies, CheckpointError lists them.
    """
    found = list_checkpoints(directory)
    errors = []
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"skipping unusable checkpoint: {e}", RuntimeWarning, stacklevel=2)
    if errors:
        raise CheckpointError("no usable checkpoint in " + os.fspath(directory) + ": " + "; ".join(errors))
    return None
