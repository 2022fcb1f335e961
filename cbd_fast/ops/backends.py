"""Backend discovery and dispatch rules shared by every op.

Backends, fastest first where they apply:

- ``cuda``:   the compiled extension's CUDA kernels (``cbd_fast._C``), CUDA tensors only.
- ``triton``: Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` is set.
- ``cpp``:    the compiled extension's C++ CPU kernels, CPU tensors only.
- ``torch``:  the pure-PyTorch reference (``cbd_fast.ops.reference``), any device, always there.

Rules (Liger-Kernel's): ``backend=None`` picks automatically (the ``CBD_FAST_BACKEND``
environment variable overrides it) and falls back quietly, logging the reason at debug level;
a backend asked for by name that cannot serve raises a ``RuntimeError`` naming it and why.
Nothing here initialises CUDA or imports Triton at ``import cbd_fast`` time.

Runtime fallback (``run_with_fallback``): a backend that is available can still fail the first
time it is used, while its kernel is compiled or launched (Triton's JIT: out of shared memory or
registers, ptxas, the launcher stub's C build; the CUDA extension: no kernel image for this GPU).
With ``backend=None`` such a failure is recorded per (op, device type, dtype, backend), warned
about once (``BackendFallbackWarning``), appended to a small log file that
``python -m cbd_fast.info`` shows (``fallback_report``), and the op runs on the next backend;
later calls skip the failed backend for the rest of the process. A backend asked for by name (or
through ``CBD_FAST_BACKEND``) never falls back: its error is raised. Which exceptions count is
defined by ``launch_failure_reason``: only failures that happen before a kernel runs, so numerical
problems (NaN/Inf, wrong values) and faults of a kernel that did run are never masked.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "FALLBACK_LOG_ENV",
    "BackendFallbackWarning",
    "available_backends",
    "backend_status",
    "candidate_backends",
    "select_backend",
    "triton_interpret",
    "launch_failure_reason",
    "run_with_fallback",
    "failed_backends",
    "fallback_report",
    "format_fallbacks",
    "reset_fallbacks",
]

logger = logging.getLogger("cbd_fast.ops.backends")

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpp", "torch")
ENV_VAR = "CBD_FAST_BACKEND"


def triton_interpret() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``): kernels run on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def _cuda_reason(dev: str) -> str | None:
    if dev != "cuda":
        return f"serves CUDA tensors only, not {dev!r} tensors"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


_TRITON_SPEC: dict[object, bool] = {}


def _triton_installed() -> bool:
    """Whether the triton package is importable, looked up once per process.

    ``find_spec`` costs ~0.2 ms and the ops ask on every call (13 times per CBD step), so the answer
    is cached, keyed by the ``find_spec`` function itself so a test that patches it is still obeyed.
    """
    finder = importlib.util.find_spec
    if finder not in _TRITON_SPEC:
        _TRITON_SPEC[finder] = finder("triton") is not None
    return _TRITON_SPEC[finder]


def _no_cuda_kernels_reason(op: str | None) -> str:
    """Why the cuda backend cannot serve ``op`` although the extension loaded (see ``_ext.has_cuda``)."""
    from cbd_fast.ops import _ext
    from cbd_fast.ops.build_info import build_info

    ops = _ext.NATIVE_OPS[op] if op in _ext.NATIVE_OPS else [q for qs in _ext.NATIVE_OPS.values() for q in qs]
    missing = [q for q in ops if not _ext.has_kernel(q, "CUDA")]
    if not build_info().get("cuda_compiled", False):
        return "the compiled extension was built without CUDA kernels"
    return (
        f"no CUDA kernel is registered for {', '.join(missing) or ops}, although the build record "
        "says CUDA was compiled (stale or mixed build: rebuild with CBD_FAST_FORCE_CUDA=1)"
    )


def backend_status(device: str | torch.device | None = "cpu", op: str | None = None) -> dict[str, str | None]:
    """For each backend, ``None`` if it can serve tensors on ``device``, else the reason why not.

    Args:
        device: a device or device string ("cpu", "cuda", "cuda:1", ...).
        op: "nt_xent" or "pgd_step" to ask about that op's native kernels only; None asks about
            every op (the cuda backend then needs a CUDA kernel registered for all of them).

    Returns:
        ``{"cuda": reason_or_None, "triton": ..., "cpp": ..., "torch": None}``, in BACKENDS order.
    """
    from cbd_fast.ops import _ext  # local: keeps `import cbd_fast` free of the extension load

    dev = _device_type(device)
    status: dict[str, str | None] = {}
    ext_op = op if op in _ext.NATIVE_OPS else None

    # cuda: needs the extension, CUDA kernels registered by it (asked of the dispatcher), a device.
    ext_err = _ext.load_error()
    if ext_err is not None:
        status["cuda"] = f"compiled extension not loaded: {ext_err}"
    elif not _ext.has_cuda(ext_op):
        status["cuda"] = _no_cuda_kernels_reason(ext_op)
    else:
        status["cuda"] = _cuda_reason(dev)

    # triton: needs the package; CUDA tensors, or CPU tensors under the interpreter.
    if not _triton_installed():
        status["triton"] = "the triton package is not installed"
    elif dev == "cpu":
        status["triton"] = None if triton_interpret() else "CPU tensors need TRITON_INTERPRET=1 (interpreter)"
    elif dev == "cuda":
        status["triton"] = None if torch.cuda.is_available() else _cuda_reason(dev)
    else:
        status["triton"] = f"does not serve {dev!r} tensors"

    # cpp: needs the extension; CPU tensors only.
    if ext_err is not None:
        status["cpp"] = f"compiled extension not loaded: {ext_err}"
    elif dev != "cpu":
        status["cpp"] = f"serves CPU tensors only, not {dev!r} tensors"
    else:
        status["cpp"] = None

    status["torch"] = None
    return status


def available_backends(device: str | torch.device | None = "cpu") -> list[str]:
    """Names of the op backends usable for tensors on ``device``, in BACKENDS order.

    Example:
        >>> import cbd_fast
        >>> cbd_fast.available_backends("cpu")  # doctest: +SKIP
        ['cpp', 'torch']
    """
    return [name for name, reason in backend_status(device).items() if reason is None]


def candidate_backends(
    op: str,
    device: str | torch.device,
    requested: str | None = None,
    priority: Sequence[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[list[str], bool]:
    """The backends to try for ``op`` on ``device``, in order, and whether the choice was named.

    Args:
        op, device, requested, priority: as for ``select_backend``.
        dtype: the tensors' dtype; when given, backends that failed to compile or launch for
            (op, device type, dtype) earlier in this process are left out of an automatic list.

    Returns:
        ``(names, named)``: ``named`` is True when ``requested`` or ``CBD_FAST_BACKEND`` chose the
        backend (then ``names`` holds only it and nothing falls back); otherwise ``names`` are the
        available backends of ``priority`` in order, ending with "torch".

    Raises:
        ValueError, RuntimeError: as ``select_backend``.
    """
    source = "backend"
    if requested is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            requested, source = env, f"{ENV_VAR} environment variable"
    if requested is not None:
        if not isinstance(requested, str) or requested.lower() not in BACKENDS:
            raise ValueError(f"{source} must be one of {list(BACKENDS)} or None; got {requested!r}")
        requested = requested.lower()
        reason = backend_status(device, op)[requested]
        if reason is not None:
            raise RuntimeError(
                f"{op}: backend {requested!r} (from {source}) cannot serve tensors on "
                f"{torch.device(device)}: {reason}"
            )
        return [requested], True

    dev = _device_type(device)
    if priority is None:
        priority = ("cuda", "triton", "cpp", "torch") if dev == "cuda" else ("cpp", "torch")
    unknown = [name for name in priority if name not in BACKENDS]
    if unknown:
        raise ValueError(f"priority must name backends from {list(BACKENDS)}; got {list(priority)!r}")
    status = backend_status(device, op)
    failed = failed_backends(op, dev, dtype) if dtype is not None else set()
    names = []
    for name in priority:
        if status[name] is not None:
            logger.debug("%s: skipping backend %r on %s: %s", op, name, dev, status[name])
        elif name in failed:
            logger.debug("%s: skipping backend %r on %s %s: failed earlier", op, name, dev, dtype)
        else:
            names.append(name)
    if "torch" not in names:
        names.append("torch")
    return names[: names.index("torch") + 1], False


def select_backend(
    op: str,
    device: str | torch.device,
    requested: str | None = None,
    priority: Sequence[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> str:
    """Resolve which backend runs ``op`` on tensors living on ``device``.

    Args:
        op: op name ("nt_xent", "pgd_step"): used in messages and to ask whether the extension
            registered CUDA kernels for this op.
        device: where the op's tensors live.
        requested: a backend name, or None for automatic. ``CBD_FAST_BACKEND`` replaces None.
        priority: automatic order for this op and device; defaults to ("cuda", "triton", "cpp",
            "torch") on CUDA and ("cpp", "torch") on CPU (the Triton interpreter is never picked
            automatically: it is a test vehicle, not a fast path).
        dtype: the tensors' dtype; when given, an automatic choice skips backends that failed to
            compile or launch for (op, device type, dtype) earlier in this process.

    Returns:
        The backend name.

    Raises:
        ValueError: ``requested`` (or the environment variable) is not a backend name.
        RuntimeError: a backend asked for by name cannot serve these tensors; says why.
    """
    return candidate_backends(op, device, requested, priority, dtype=dtype)[0][0]


# ---- runtime fallback on compile/launch failures -------------------------------------------------------


class BackendFallbackWarning(RuntimeWarning):
    """A backend failed to compile or launch a kernel; the op ran on the next backend."""


#: Environment variable naming the fallback log file ("0" or "off" disables it).
FALLBACK_LOG_ENV = "CBD_FAST_FALLBACK_LOG"
_LOG_KEEP = 50  # lines kept in the log file

# CUDA errors the driver reports when it refuses a launch before the kernel starts; the context
# stays usable, so another backend can run. cudaGetErrorString / cuGetErrorString texts.
_PRE_LAUNCH_CUDA_ERRORS = (
    "too many resources requested for launch",  # registers x threads over the SM's limit
    "no kernel image is available for execution",  # built for other architectures
    "invalid device function",
    "device kernel image is invalid",
    "unsupported toolchain",  # PTX newer than the driver
    "unsupported ptx version",
    "invalid configuration argument",  # grid/block dimensions over the device's limits
    "out of resource",  # Triton's OutOfResources text (shared memory, registers)
)
# CUDA errors that report a kernel that already ran and faulted (they are sticky: the context is
# unusable), or memory pressure. Never a reason to fall back: the next backend would hide a bug or
# fail the same way.
_FATAL_CUDA_ERRORS = (
    "illegal memory access",
    "illegal address",
    "misaligned address",
    "illegal instruction",
    "unspecified launch failure",
    "device-side assert",
    "launch timed out",
    "hardware stack error",
    "uncorrectable ecc",
    "out of memory",
)
# Triton source folders whose code runs before a kernel is launched: the compiler pipeline and the
# build of the C launcher stub. An exception raised in them is a compile-time failure.
_TRITON_COMPILE_PATHS = (
    os.sep + os.path.join("triton", "compiler") + os.sep,
    os.sep + os.path.join("triton", "runtime", "build.py"),
    os.sep + os.path.join("triton", "backends") + os.sep,  # .../backends/<vendor>/compiler.py only
)

_failed: dict[tuple[str, str, str, str], dict[str, Any]] = {}
_lock = threading.Lock()

T = TypeVar("T")


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    return str(dtype).removeprefix("torch.")


def _triton_exception_types() -> tuple[type, ...]:
    """Triton's compile-time exception classes (only when Triton is already imported)."""
    if "triton" not in sys.modules:
        return ()
    found: list[type] = []
    for module, names in (
        ("triton.compiler.errors", ("CompilationError",)),
        ("triton.runtime.errors", ("OutOfResources", "PTXASError")),
    ):
        mod = sys.modules.get(module)
        found += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(found)


def _raised_in_triton_compiler(exc: BaseException) -> bool:
    """True when a frame of ``exc``'s traceback is Triton's compiler or launcher build."""
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename
        for marker in _TRITON_COMPILE_PATHS:
            if marker in path and (not marker.endswith("backends" + os.sep) or path.endswith("compiler.py")):
                return True
    return False


def launch_failure_reason(backend: str, exc: BaseException) -> str | None:
    """The reason text when ``exc`` is a compile/launch failure of ``backend``, else None.

    Counted (the op may fall back), all failures that happen before a kernel runs, so nothing was
    computed or written and the device is untouched:

    - triton: ``CompilationError`` (front end), ``OutOfResources`` (shared memory or registers
      over the device's limit, checked before the launch), ``PTXASError``, any exception raised in
      Triton's compiler pipeline or its launcher build (``triton/compiler/``,
      ``triton/backends/*/compiler.py``, ``triton/runtime/build.py``: an MLIR pass failure is a
      plain RuntimeError, a missing C compiler a CalledProcessError), and ``ImportError`` (a
      broken Triton install);
    - triton and cuda: a launch the driver refuses before starting the kernel (no kernel image for
      this GPU, too many resources requested, invalid configuration, PTX too new for the driver);
    - cuda: ``NotImplementedError`` from the dispatcher (no CUDA kernel registered for the op).

    Never counted: ``torch.OutOfMemoryError`` and any "out of memory" (memory pressure, not a
    backend defect), the sticky CUDA errors of a kernel that ran and faulted (illegal memory
    access, misaligned address, device-side assert, ...: the context is unusable and a fallback
    would hide the bug), argument errors (TypeError, ValueError), Triton interpreter errors, and
    any other exception. NaN/Inf or wrong values are not exceptions and are never looked at.

    Args:
        backend: the backend that raised ("triton", "cuda"; others never fall back).
        exc: the exception.

    Returns:
        ``"compile: <type>: <message>"`` or ``"launch: <type>: <message>"``, or None.
    """
    if backend not in ("triton", "cuda") or not isinstance(exc, Exception):
        return None
    try:
        text = f"{type(exc).__name__}: {exc}".strip()
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails still has a type
        text = type(exc).__name__
    low = text.lower()
    if isinstance(exc, torch.OutOfMemoryError) or any(m in low for m in _FATAL_CUDA_ERRORS):
        return None
    short = text if len(text) <= 500 else text[:497] + "..."
    if backend == "triton":
        triton_types = _triton_exception_types()
        if triton_types and isinstance(exc, triton_types):
            return f"compile: {short}"
        if isinstance(exc, ImportError):
            return f"compile: {short}"
        if type(exc).__name__ != "InterpreterError" and _raised_in_triton_compiler(exc):
            return f"compile: {short}"
    if backend == "cuda" and isinstance(exc, NotImplementedError) and "cbd_fast::" in text:
        return f"launch: {short}"
    if isinstance(exc, RuntimeError) and any(m in low for m in _PRE_LAUNCH_CUDA_ERRORS):
        return f"launch: {short}"
    return None


def failed_backends(op: str, device: str | torch.device, dtype: torch.dtype | str | None) -> set[str]:
    """Backends that failed to compile or launch ``op`` for (device type, dtype) in this process."""
    dev, dt = _device_type(device), _dtype_name(dtype)
    with _lock:
        return {b for (o, d, t, b) in _failed if (o, d, t) == (op, dev, dt)}


def _log_path() -> Path | None:
    value = os.environ.get(FALLBACK_LOG_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cbd_fast" / "backend_fallbacks.jsonl"


def _append_log(record: dict[str, Any]) -> None:
    """Best effort: keep the last ``_LOG_KEEP`` records; an unwritable log is ignored."""
    path = _log_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = path.read_text().splitlines()[-(_LOG_KEEP - 1) :] if path.exists() else []
        lines.append(json.dumps(record, default=str))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("cannot write the fallback log %s: %s", path, exc)


def _record(op: str, dev: str, dtype: str, backend: str, fallback: str, reason: str) -> bool:
    """Record a failure; True when it is new (then it is warned about and logged)."""
    key = (op, dev, dtype, backend)
    with _lock:
        if key in _failed:
            return False
        record = {
            "op": op,
            "device": dev,
            "dtype": dtype,
            "backend": backend,
            "fallback": fallback,
            "reason": reason,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", None),
        }
        _failed[key] = record
    _append_log(record)
    return True


def run_with_fallback(
    op: str,
    device: str | torch.device,
    dtype: torch.dtype,
    names: Sequence[str],
    call: Callable[[str], T],
    *,
    named: bool = False,
) -> T:
    """``call(name)`` for the first backend of ``names`` that does not fail to compile or launch.

    A failure that ``launch_failure_reason`` counts is recorded for (op, device type, dtype,
    backend), warned about once with a ``BackendFallbackWarning``, written to the fallback log,
    and the next name is tried; any other exception propagates unchanged, as does the failure of
    the last name or of a backend asked for by name (``named``).

    Args:
        op: the op's name ("nt_xent", "pgd_step").
        device, dtype: the tensors' device and dtype (the record's key).
        names: backends in order of preference (``candidate_backends``).
        call: runs the op on one backend and returns its result.
        named: True when the caller named the backend: then only ``names[0]`` runs, errors raise.

    Returns:
        What ``call`` returned.
    """
    if named or len(names) == 1:
        return call(names[0])
    dev, dt = _device_type(device), _dtype_name(dtype)
    for i, name in enumerate(names):
        last = i == len(names) - 1
        if not last and name in failed_backends(op, dev, dt):
            continue
        try:
            return call(name)
        except Exception as exc:
            reason = None if last else launch_failure_reason(name, exc)
            if reason is None:
                raise
            fallback = names[i + 1]
            if _record(op, dev, dt, name, fallback, reason):
                warnings.warn(
                    f"cbd_fast: {op} on {dev} {dt} tensors: backend {name!r} failed to "
                    f"{reason.split(':', 1)[0]} ({reason.split(': ', 1)[1]}); falling back to "
                    f"{fallback!r} for the rest of this process. `python -m cbd_fast.info` lists "
                    f"the fallbacks; backend={name!r} raises the error instead.",
                    BackendFallbackWarning,
                    stacklevel=3,
                )
    raise AssertionError("unreachable: the last backend either returns or raises")  # pragma: no cover


def fallback_report(include_log: bool = True) -> list[dict[str, Any]]:
    """The compile/launch failures that made an op fall back, newest last.

    Args:
        include_log: also list the records of earlier processes from the fallback log file
            (``CBD_FAST_FALLBACK_LOG``, default ``~/.cache/cbd_fast/backend_fallbacks.jsonl``).

    Returns:
        One dict per failure: ``{"op", "device", "dtype", "backend", "fallback", "reason", "time",
        "pid", "torch", "triton", "source"}``; ``source`` is "this process" or "log".
    """
    with _lock:
        mine = [dict(r, source="this process") for r in _failed.values()]
    if not include_log:
        return mine
    seen = {(r["pid"], r["op"], r["device"], r["dtype"], r["backend"]) for r in mine}
    logged: list[dict[str, Any]] = []
    path = _log_path()
    try:
        lines = path.read_text().splitlines() if path is not None and path.exists() else []
    except OSError:
        lines = []
    for line in lines:
        try:
            r = json.loads(line)
            key = (r["pid"], r["op"], r["device"], r["dtype"], r["backend"])
        except (ValueError, KeyError, TypeError):
            continue
        if key not in seen:
            logged.append(dict(r, source="log"))
    return logged + mine


def format_fallbacks(report: list[dict[str, Any]] | None = None) -> list[str]:
    """Text lines for ``python -m cbd_fast.info``: one per recorded fallback, or one saying none."""
    report = fallback_report() if report is None else report
    if not report:
        return ["backend fallbacks: none recorded"]
    lines = [f"backend fallbacks ({len(report)}; newest last):"]
    for r in report:
        lines.append(
            f"  {r.get('time', '?')} {r['op']} {r['device']} {r['dtype']}: {r['backend']} -> "
            f"{r.get('fallback', '?')} ({r.get('source', '?')}, torch {r.get('torch')}, "
            f"triton {r.get('triton')}): {r['reason']}"
        )
    return lines


def reset_fallbacks() -> None:
    """Forget this process's recorded failures (the log file is kept): failed backends are retried."""
    with _lock:
        _failed.clear()
