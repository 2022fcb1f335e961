"""``python -m cbd_fast.info``: the build record and, per device, which backends can serve and why not.

Example output (CPU machine, CPU build; abridged)::

    cbd_fast 0.1.0 at /path/to/site-packages/cbd_fast
    build record:
      backends_compiled  cpp
      cuda_compiled      False
      cuda_reason        torch 2.13.0+cpu is a CPU-only build
      torch_version      2.13.0+cpu
    compiled extension: loaded (CPU kernels: avx2)
    runtime: python 3.11.7, torch 2.13.0+cpu (CUDA None), GPUs visible 0, triton 3.9.0, ...
    CPU bfloat16: emulated: keep amp_dtype float32 (the CPU default)
    backends for cpu tensors:
      cuda    no   the compiled extension was built without CUDA kernels
      triton  no   CPU tensors need TRITON_INTERPRET=1 (interpreter)
      cpp     yes
      torch   yes
    backends for cuda tensors:
      ...

The CLI's ``cbd-fast info`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from typing import Any

__all__ = ["collect", "format_report", "main"]

DEVICES: tuple[str, ...] = ("cpu", "cuda")


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """Everything ``info`` shows, as a JSON-able dict.

    Returns:
        ``{"version", "package_dir", "build": <build record>, "extension_error": str | None,
        "cpu_isa": str | None (the CPU kernels' instruction set),
        "cpu_bf16": {"native": bool (AVX512-BF16 or AMX, as oneDNN reports), "amx": bool},
        "runtime": {"torch", "torch_cuda", "cuda_available", "gpu_count", "triton",
        "triton_interpret"}, "backends": {device: {backend: None | reason}}}``.
        Asking whether CUDA is available initialises nothing but the driver query.
    """
    import torch

    import cbd_fast
    from cbd_fast.ops import _ext
    from cbd_fast.ops.backends import BACKENDS, backend_status, fallback_report
    from cbd_fast.ops.build_info import build_info

    cuda_ok = torch.cuda.is_available()
    backends = {dev: backend_status(dev) for dev in DEVICES}
    for dev, status in backends.items():  # keep BACKENDS order and every name, whatever happens
        backends[dev] = {name: status.get(name, "unknown") for name in BACKENDS}
    return {
        "version": cbd_fast.__version__,
        "package_dir": os.path.dirname(os.path.abspath(cbd_fast.__file__)),
        "build": dict(build_info()),
        "extension_error": _ext.load_error(),
        "cpu_isa": _ext.cpu_isa(),
        "cpu_bf16": cpu_bf16(),
        "runtime": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_available": cuda_ok,
            "gpu_count": torch.cuda.device_count() if cuda_ok else 0,
            "triton": _triton_version(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        },
        "backends": backends,
        "fallbacks": fallback_report(),
    }


def cpu_bf16() -> dict[str, bool]:
    """Whether this CPU computes bfloat16 natively (``native``: AVX512-BF16 or AMX, as oneDNN
    reports it) and has AMX tiles (``amx``); False where this torch cannot tell."""
    from cbd_fast.core.purify import cpu_has_native_bf16

    try:
        import torch

        amx = bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # an older torch
        amx = False
    return {"native": cpu_has_native_bf16(), "amx": amx}


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def format_report(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`collect`'s dict (one backend per line, with its reason)."""
    lines = [f"cbd_fast {info['version']} at {info['package_dir']}", "build record:"]
    build = info["build"]
    width = max((len(k) for k in build), default=0)
    for key in sorted(build):
        lines.append(f"  {key:<{width}}  {_fmt(build[key])}")
    ext_err = info["extension_error"]
    isa = info.get("cpu_isa")
    loaded = "loaded" + (f" (CPU kernels: {isa})" if isa else "")
    lines.append(f"compiled extension: {loaded if ext_err is None else 'not loaded: ' + ext_err}")
    rt = info["runtime"]
    lines.append(
        f"runtime: python {rt['python']}, torch {rt['torch']} (CUDA {rt['torch_cuda']}), "
        f"GPUs visible {rt['gpu_count']}, triton {rt['triton'] or 'not installed'}, "
        f"TRITON_INTERPRET={rt['triton_interpret'] or 'unset'}"
    )
    bf16 = info.get("cpu_bf16")
    if bf16 is not None:
        if bf16["amx"]:
            hint = "native, AMX: amp_dtype='bfloat16' is the faster CPU choice (method.md 4.15)"
        elif bf16["native"]:
            hint = "native (AVX512-BF16): amp_dtype='bfloat16' pays for wide convolutions (method.md 4.15)"
        else:
            hint = "emulated: keep amp_dtype float32 (the CPU default)"
        lines.append(f"CPU bfloat16: {hint}")
    for dev, status in info["backends"].items():
        lines.append(f"backends for {dev} tensors:")
        for name, reason in status.items():
            lines.append(f"  {name:<7} {'yes' if reason is None else 'no '}  {reason or ''}".rstrip())
    from cbd_fast.ops.backends import format_fallbacks

    lines += format_fallbacks(info.get("fallbacks", []))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the build record and backend availability; ``--json`` prints the dict instead.

    Args:
        argv: command-line arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        0 (the process exit status).
    """
    parser = argparse.ArgumentParser(
        prog="cbd-fast info",
        description="Show how cbd_fast was built and which op backends can run here, or why not.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
