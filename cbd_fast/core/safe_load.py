"""Reading files that come from outside without running anything in them.

The models cbd_fast purifies are, by definition, not trusted, and neither are the files that carry
them. Every loader in the package reads tensor files through this module:

- ``torch.save`` files (zip archives and the legacy non-zip format) are inspected before torch reads
  them: the zip structure (truncated or corrupted archives, entries whose declared size is out of
  proportion to the file: zip bomb-like), the CRC-32 of every entry (torch itself reads corrupted
  tensor bytes without complaint), and every global the pickle names, found by disassembling it with
  :mod:`pickletools` (static: nothing is executed). A pickle that names anything outside torch's
  ``weights_only`` allowlist is refused with the names; otherwise the file is read with
  ``torch.load(weights_only=True)``, which would refuse such globals anyway (two independent guards).
- ``.npy``/``.npz``: ``np.load(allow_pickle=False)``, after the same zip checks for ``.npz``.
- ``.safetensors``: the header (length, JSON, every tensor's dtype, shape and offsets) is checked
  before the safetensors library reads it, so a header that lies gets an error naming the tensor.

TorchScript archives get the zip checks here; :mod:`cbd_fast.app.model_io` then reads them with
``torch.jit.load`` only. Errors are :class:`UnsafeFileError` (a ValueError) whose message says what is
wrong without the file name, so callers can prefix their own context.

Example:
    >>> state = torch_load_weights("weights.pt")               # doctest: +SKIP
    >>> info = inspect_torch_file("model.pt"); info.unsafe_globals  # doctest: +SKIP
    ('builtins.exec',)
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import hashlib
import json
import math
import os
import pickletools
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "MAX_EXPANSION",
    "TorchFileInfo",
    "UnsafeFileError",
    "check_safetensors",
    "check_zip_archive",
    "describe_globals",
    "inspect_torch_file",
    "load_safetensors",
    "numpy_load",
    "pickle_globals",
    "sha256_file",
    "torch_load_weights",
    "weights_only_globals",
]

#: a zip entry may declare at most this many times its stored bytes (torch stores entries uncompressed;
#: ``np.savez_compressed`` of ordinary data stays far below), beyond a small allowance
MAX_EXPANSION = 100
_EXPANSION_ALLOWANCE = 1 << 20  # 1 MiB: tiny entries may compress well without being bombs
_MAX_PICKLE_BYTES = 1 << 30  # a data.pkl holds structure, not tensor bytes
_MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit
_LEGACY_PICKLES = 5  # magic number, protocol, sys info, the object, storage keys (torch < 1.6 format)
_CHUNK = 1 << 20

#: bits per element of the safetensors dtypes (an unknown dtype is left to the library to judge)
_SAFETENSORS_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

#: what ``weights_only`` allows when torch's own list cannot be read (torch renamed a private)
_FALLBACK_SAFE_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "builtins.set",
        "torch.Size",
        "torch.device",
        "torch.serialization._get_layout",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.nn.parameter.Parameter",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
    }
    | {
        f"torch.{kind}Storage"
        for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
    }
    | {
        f"torch.{name}"
        for name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8")
    }
    | {"torch.bool"}
)

# opcodes that push the string they carry (the operands of STACK_GLOBAL)
_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_MARK = object()
_ANY = object()


class UnsafeFileError(ValueError):
    """A file was refused before (or while) reading it: malformed, or it needs code to load.

    The message says why, without the file name (callers add it with their own context).
    """


@dataclass(frozen=True)
class TorchFileInfo:
    """What :func:`inspect_torch_file` found, before anything was loaded.

    Attributes:
        kind: ``"zip"`` (``torch.save``), ``"torchscript"`` (``torch.jit.save``) or ``"legacy"``
            (the pre-1.6 non-zip ``torch.save`` format).
        sha256: hex digest of the whole file ("" when not asked for).
        globals: every global the file's pickles name, sorted (empty for TorchScript, whose pickles
            are read by TorchScript's own loader, never by Python's).
        unsafe_globals: those outside torch's ``weights_only`` allowlist: loading them would import and
            call Python code named by the file. Sorted with non-torch names first.
    """

    kind: str
    sha256: str
    globals: tuple[str, ...]
    unsafe_globals: tuple[str, ...]


# ------------------------------------------------------------------------------------------ helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes as 64 hex digits (read in 1 MiB chunks).

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_only_globals() -> frozenset[str]:
    """The globals ``torch.load(weights_only=True)`` accepts, as ``"module.name"`` strings.

    torch's default allowlist plus what the user added with ``torch.serialization.add_safe_globals``;
    a built-in list of tensor-rebuilding names when torch's list cannot be read.
    """
    allowed = set(_FALLBACK_SAFE_GLOBALS)
    try:
        from torch import _weights_only_unpickler as wou
    except ImportError:  # pragma: no cover - depends on torch internals
        return frozenset(allowed)
    for getter in ("_get_allowed_globals", "_get_user_allowed_globals"):  # the latter: torch >= 2.4
        with contextlib.suppress(Exception):  # depends on torch internals
            allowed.update(getattr(wou, getter)())
    return frozenset(allowed)


def describe_globals(names: Iterable[str], limit: int = 6) -> str:
    """``"builtins.exec, posix.system"`` (at most ``limit`` names, then ``"... (+N more)"``)."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _order(names: Iterable[str]) -> tuple[str, ...]:
    """Non-torch names first (the ones a reader should look at), then torch's, each sorted."""
    return tuple(sorted(set(names), key=lambda g: (g.startswith("torch."), g)))


# ------------------------------------------------------------------------------------------ pickles


def pickle_globals(stream: bytes | IO[bytes]) -> list[str]:
    """Every global one pickle names, found by disassembling it (nothing is executed).

    ``GLOBAL``/``INST`` carry ``module name`` in the opcode; ``STACK_GLOBAL`` takes them from the stack,
    so strings and the memo are tracked through a symbolic stack. Operands that cannot be known
    statically are reported as ``"<...>"`` entries, which no allowlist contains. Extension-registry
    opcodes (``EXT1/2/4``) likewise. Reading stops at the pickle's ``STOP``.

    Args:
        stream: the pickle's bytes, or a binary file positioned at its start (left after its STOP).

    Returns:
        the ``"module.name"`` strings in order of appearance, without duplicates.

    Raises:
        UnsafeFileError: the bytes are not a well-formed pickle (truncated, unknown opcode, a stack
            that underflows).
    """
    found: dict[str, None] = {}
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, qual = str(arg).partition(" ")
                found[_python3_name(module, qual)] = None
            elif name == "STACK_GLOBAL":
                if len(stack) < 2:
                    raise ValueError("STACK_GLOBAL on a stack with fewer than two items")
                qual, module = stack.pop(), stack.pop()
                if isinstance(module, str) and isinstance(qual, str):
                    found[_python3_name(module, qual)] = None
                else:
                    found["<a global chosen at load time (STACK_GLOBAL of computed strings)>"] = None
                stack.append(_ANY)
                continue
            elif name.startswith("EXT"):
                found[f"<extension registry code {arg}>"] = None
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack:
                    raise ValueError(f"{name} on an empty stack")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _ANY))
                continue
            _apply_stack_effect(op, stack)
            if name in _STRING_OPS and isinstance(arg, str) and stack:
                stack[-1] = arg
    except UnsafeFileError:
        raise
    except (ValueError, EOFError, MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise UnsafeFileError(f"a malformed or truncated pickle ({_first_line(exc)})") from exc
    return list(found)


def _python3_name(module: str, name: str) -> str:
    """``"module.name"`` as the unpickler resolves it: protocol-2 pickles (torch.save's) spell Python 2
    names (``__builtin__.set``), which it maps to Python 3's (``builtins.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _apply_stack_effect(op: pickletools.OpcodeInfo, stack: list[Any]) -> None:
    """Pop what ``op`` consumes and push placeholders for what it produces."""
    before = op.stack_before
    if pickletools.markobject in before:
        below = before.index(pickletools.markobject)
        while True:
            if not stack:
                raise ValueError(f"{op.name} found no MARK on the stack")
            if stack.pop() is _MARK:
                break
        pops = below
    else:
        pops = len(before)
    if pops > len(stack):
        raise ValueError(f"{op.name} needs {pops} stack item(s); the stack holds {len(stack)}")
    if pops:
        del stack[-pops:]
    for item in op.stack_after:
        stack.append(_MARK if item is pickletools.markobject else _ANY)


class _Bounded:
    """A read-only view of a file that never reads past ``size`` (lengths in a hostile pickle lie)."""

    def __init__(self, fh: IO[bytes], size: int) -> None:
        self._fh = fh
        self._size = size

    def read(self, n: int = -1) -> bytes:
        left = max(self._size - self._fh.tell(), 0)
        return self._fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._fh.readline(max(self._size - self._fh.tell(), 0))

    def tell(self) -> int:
        return self._fh.tell()


# ------------------------------------------------------------------------------------------ zip archives


def check_zip_archive(path: str | os.PathLike[str], *, verify_crc: bool = True) -> list[zipfile.ZipInfo]:
    """Check a zip archive's structure (and every entry's CRC-32) without trusting its directory.

    Refused, before any entry is decompressed: an archive whose end-of-file directory is missing or
    garbled (truncated or corrupted), an encrypted entry, an uncompressed entry whose declared size
    differs from its stored size, an entry that runs past the end of the file, and declared sizes
    that add up to more than :data:`MAX_EXPANSION` times the file (plus 1 MiB): a zip bomb-like
    archive. Then, with ``verify_crc``, every entry is read in 1 MiB chunks and its CRC-32 checked.

    Args:
        path: the archive.
        verify_crc: also read every entry and check its CRC-32 (torch does not: a flipped byte in a
            tensor would otherwise load silently).

    Returns:
        the archive's entries.

    Raises:
        UnsafeFileError: what is wrong, naming the entry and the sizes.
    """
    size = os.path.getsize(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnsafeFileError(f"a truncated or corrupted zip archive ({_first_line(exc)})") from exc
    with zf:
        infos = zf.infolist()
        if not infos:
            raise UnsafeFileError("an empty zip archive")
        declared = 0
        for info in infos:
            if info.flag_bits & 0x1:
                raise UnsafeFileError(f"entry {info.filename!r} is encrypted")
            if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                raise UnsafeFileError(
                    f"a corrupted zip archive: entry {info.filename!r} is stored uncompressed but declares "
                    f"{info.file_size} bytes and stores {info.compress_size}"
                )
            if info.header_offset + info.compress_size > size:
                raise UnsafeFileError(
                    f"a truncated zip archive: entry {info.filename!r} runs past the end of the file "
                    f"({info.header_offset + info.compress_size} > {size} bytes)"
                )
            declared += info.file_size
        limit = MAX_EXPANSION * size + _EXPANSION_ALLOWANCE
        if declared > limit:
            biggest = max(infos, key=lambda i: i.file_size)
            raise UnsafeFileError(
                f"a zip bomb-like archive: its entries declare {declared} bytes uncompressed from a "
                f"{size}-byte file (limit {limit}: {MAX_EXPANSION}x + 1 MiB); the largest, "
                f"{biggest.filename!r}, declares {biggest.file_size} bytes from {biggest.compress_size}"
            )
        if verify_crc:
            for info in infos:
                try:
                    with zf.open(info) as entry:
                        while entry.read(_CHUNK):
                            pass
                except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError, NotImplementedError
                    raise UnsafeFileError(
                        f"a corrupted zip archive: entry {info.filename!r}: {_first_line(exc)}"
                    ) from exc
    return infos


def _read_entry(path: str | os.PathLike[str], info: zipfile.ZipInfo) -> bytes:
    if info.file_size > _MAX_PICKLE_BYTES:
        raise UnsafeFileError(
            f"entry {info.filename!r} declares {info.file_size} bytes; a pickle of structure stays under "
            f"{_MAX_PICKLE_BYTES}"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.read(info)
    except Exception as exc:
        raise UnsafeFileError(
            f"a corrupted zip archive: entry {info.filename!r}: {_first_line(exc)}"
        ) from exc


def _is_torchscript(names: Iterable[str]) -> bool:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


# ------------------------------------------------------------------------------------------ torch files


def inspect_torch_file(path: str | os.PathLike[str], *, digest: bool = True) -> TorchFileInfo:
    """Inspect a ``torch.save`` / ``torch.jit.save`` file without loading it.

    Zip archives get :func:`check_zip_archive` (structure, sizes, CRC-32); then every ``.pkl`` entry of
    a ``torch.save`` archive, or the first five pickles of a legacy file (all that ``torch.load``
    unpickles), is disassembled by :func:`pickle_globals`.

    Args:
        path: the file.
        digest: also compute the file's SHA-256.

    Returns:
        a :class:`TorchFileInfo`.

    Raises:
        UnsafeFileError: not a torch file, or a truncated, corrupted or zip bomb-like one.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        infos = check_zip_archive(path)
        names = [i.filename for i in infos]
        if _is_torchscript(names):
            kind, found = "torchscript", []
        else:
            pickles = [i for i in infos if i.filename.endswith(".pkl")]
            if not pickles:
                raise UnsafeFileError(
                    f"a zip archive without data.pkl: not a torch.save file (entries: {names[:5]})"
                )
            kind, found = "zip", []
            for info in pickles:
                found += pickle_globals(_read_entry(path, info))
    elif head[:1] == b"\x80":  # pickle protocol >= 2: torch.save's legacy format, or a bare pickle
        if tarfile.is_tarfile(path):  # torch.load would read it as the torch < 0.4 tar format
            raise UnsafeFileError("a tar archive (the torch < 0.4 format), which cbd_fast does not read")
        kind, found = "legacy", []
        with open(path, "rb") as fh:
            bounded = _Bounded(fh, size)
            for _ in range(_LEGACY_PICKLES):
                if fh.tell() >= size:
                    break
                found += pickle_globals(bounded)
    elif size == 0:
        raise UnsafeFileError("an empty file")
    else:
        raise UnsafeFileError(f"not a TorchScript archive nor a torch.save file (it starts with {head!r})")
    allowed = weights_only_globals()
    unsafe = [g for g in found if g not in allowed]
    return TorchFileInfo(
        kind=kind,
        sha256=sha256_file(path) if digest else "",
        globals=tuple(sorted(set(found))),
        unsafe_globals=_order(unsafe),
    )


def torch_load_weights(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` after :func:`inspect_torch_file`.

    For files that must hold only data (state_dicts, tensors, labels): a TorchScript archive or a
    pickle naming non-tensor globals is refused before torch reads it.

    Args:
        path: a ``torch.save`` file.

    Returns:
        the loaded object (tensors on the CPU).

    Raises:
        UnsafeFileError: the file was refused or torch could not read it; the message says why.
    """
    info = inspect_torch_file(path, digest=False)
    if info.kind == "torchscript":
        raise UnsafeFileError("a TorchScript archive, not a file of tensors")
    if info.unsafe_globals:
        raise UnsafeFileError(
            f"its pickle names non-tensor globals ({describe_globals(info.unsafe_globals)}); tensor files "
            "are only read with torch.load(weights_only=True), never unpickled as code"
        )
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeFileError(f"torch.load(weights_only=True) failed: {_first_line(exc)}") from exc


# ------------------------------------------------------------------------------------------ numpy


def numpy_load(path: str | os.PathLike[str]) -> Any:
    """``np.load(path, allow_pickle=False)`` after :func:`check_zip_archive` for an ``.npz`` archive.

    Args:
        path: a ``.npy`` or ``.npz`` file.

    Returns:
        an array, or an ``NpzFile`` mapping of arrays.

    Raises:
        UnsafeFileError: a refused ``.npz`` (truncated, corrupted, zip bomb-like).
        ValueError: numpy's own error (an object array needing pickle, a malformed header).
    """
    import numpy as np

    with open(path, "rb") as fh:
        zipped = fh.read(2) == b"PK"
    if zipped:
        check_zip_archive(path)
    return np.load(path, allow_pickle=False)


# ------------------------------------------------------------------------------------------ safetensors


def check_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a ``.safetensors`` file's header against the file before any tensor is read.

    The 8-byte header length must fit the file (and the format's 100 MB limit), the header must be a
    JSON object, and every tensor entry must have a dtype, a shape of non-negative integers, and
    ``data_offsets`` inside the data section spanning exactly ``prod(shape) x dtype size`` bytes.

    Args:
        path: the file.

    Returns:
        the parsed header.

    Raises:
        UnsafeFileError: the first lie found, naming the tensor, its shape and offsets.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnsafeFileError(f"{size} bytes: too short for a safetensors file (an 8-byte header length)")
        length = int.from_bytes(head, "little")
        if length > size - 8 or length > _MAX_SAFETENSORS_HEADER:
            raise UnsafeFileError(
                f"its header length says {length} bytes but the file has {size - 8} after it "
                f"(limit {_MAX_SAFETENSORS_HEADER}): truncated, or not a safetensors file"
            )
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnsafeFileError(f"its header is not valid JSON ({_first_line(exc)})") from exc
    if not isinstance(header, dict):
        raise UnsafeFileError(f"its header must be a JSON object; got a {type(header).__name__}")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise UnsafeFileError(f"tensor {name!r}: its header entry is not an object; got {entry!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise UnsafeFileError(
                f"tensor {name!r}: shape must be a list of non-negative integers; got {shape!r}"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise UnsafeFileError(f"tensor {name!r}: data_offsets must be [begin, end]; got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise UnsafeFileError(
                f"tensor {name!r}: data_offsets [{begin}, {end}] fall outside the {data_bytes} data bytes"
            )
        bits = _SAFETENSORS_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is not None:
            need = math.ceil(math.prod(shape) * bits / 8)
            if end - begin != need:
                raise UnsafeFileError(
                    f"tensor {name!r}: shape {shape} of {dtype} needs {need} bytes but data_offsets "
                    f"[{begin}, {end}] hold {end - begin}"
                )
    return header


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``safetensors.torch.load_file(path, device="cpu")`` after :func:`check_safetensors`.

    Args:
        path: the file.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        UnsafeFileError: a refused header, or the library's own complaint (overlapping or uncovered
            data, an unknown dtype).
        ImportError: safetensors is not installed.
    """
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise UnsafeFileError(_first_line(exc)) from exc
