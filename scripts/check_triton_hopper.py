#!/usr/bin/env python3
"""Compile every Triton kernel of cbd_fast for Hopper (sm_90) on a machine without a GPU.

Catches GPU code rot in CI: each public module of ``cbd_fast/kernels/triton/`` must define
``hopper_compile_specs() -> list[dict]`` with keys ``name``, ``fn`` (the ``@triton.jit`` kernel),
``signature`` (``{"arg": "*fp32" | "i32" | "fp32" | "constexpr" ...}``) and ``constexprs``
(``{"BLOCK": 128, ...}``), and optionally ``options`` (e.g. ``{"num_warps": 8}``, passed to
``triton.compile``) and ``aligned`` (argument names that Triton would specialise as 16-byte aligned
pointers / integers divisible by 16 at run time) and ``ptx_contains`` (instructions the PTX must
hold, e.g. ``wgmma.mma_async`` for a kernel that must use Hopper's tensor cores). Each spec is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``.

Resource check: for every kernel the log shows ptxas's figures, registers per thread
(``n_regs``), spill stores/loads in bytes (``n_spills``: their sum), stack frame and shared memory,
taken from Triton's own ptxas run (``TRITON_DUMP_PTXAS_LOG``) or, when that log is not available,
from ``ptxas -v`` run on the kernel's PTX with the same architecture; on a machine with a GPU also
the loaded kernel's ``n_regs`` / ``n_spills``. A kernel that spills registers or needs more shared
memory than an H100/H200 block may have (227 KiB) fails the check.

Must run WITHOUT ``TRITON_INTERPRET``: kernels defined in interpreter mode cannot be compiled.

    python scripts/check_triton_hopper.py [--module pgd] [--arch 90] [--json FILE]

Exit status: 0 when every kernel compiled within its resources; 1 when one failed, spilled or a
module has no specs; 2 on misuse.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cbd_fast.kernels.triton"
REQUIRED_KEYS = ("name", "fn", "signature", "constexprs")
MAX_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90 (H100/H200)

_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(text: str) -> dict[str, int] | None:
    """``{"n_regs", "spill_stores", "spill_loads", "stack", "n_spills"}`` from a ``ptxas -v`` log.

    ``n_spills`` is spill stores + spill loads in bytes (0 when nothing spills). None when the log
    holds no register line. With several functions in the log, the largest figures are kept.
    """
    regs = [int(m) for m in _USED.findall(text)]
    if not regs:
        return None
    spills = [tuple(int(x) for x in m) for m in _SPILL.findall(text)] or [(0, 0, 0)]
    stack = max(s[0] for s in spills)
    stores = max(s[1] for s in spills)
    loads = max(s[2] for s in spills)
    return {"n_regs": max(regs), "spill_stores": stores, "spill_loads": loads, "stack": stack,
            "n_spills": stores + loads}  # fmt: skip


def _ptxas_binary(arch: int) -> str | None:
    """The ptxas Triton uses for ``arch`` (its bundled one), else CUDA_HOME's, else one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # Triton >= 3.4: per architecture

        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older Triton
        pass
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older Triton: no knobs
        pass
    try:
        from triton.backends.nvidia.compiler import _path_to_binary  # Triton <= 3.3

        return _path_to_binary("ptxas")[0]
    except Exception:  # noqa: BLE001
        pass
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cand = os.path.join(cuda, "bin", "ptxas")
    return cand if os.path.exists(cand) else shutil.which("ptxas")


def ptxas_usage(ptx: str, arch: int) -> dict[str, int] | None:
    """Run ``ptxas -v`` on ``ptx`` for ``sm_<arch>a`` and parse its figures (None if no ptxas)."""
    ptxas = _ptxas_binary(arch)
    if ptxas is None:
        return None
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        proc = subprocess.run(
            [ptxas, "-lineinfo", "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    usage = parse_ptxas_log(proc.stdout + proc.stderr)
    if usage is None:
        print(f"  ptxas -v failed ({ptxas}): {(proc.stdout + proc.stderr).strip()[-300:]}", file=sys.stderr)
    return usage


def _attrs(fn, names: list[str]) -> dict:
    """Triton's specialisation attributes for arguments known to be 16-byte aligned / divisible by 16."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def _device_figures(kernel) -> dict[str, int] | None:
    """``n_regs`` / ``n_spills`` of the loaded kernel (needs a GPU of the target's architecture)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        kernel._init_handles()
        return {"n_regs": int(kernel.n_regs), "n_spills": int(kernel.n_spills)}
    except Exception:  # noqa: BLE001 - other architecture, no driver: the ptxas figures stand
        return None


def _jit_fn(fn):
    """The JITFunction under Autotuner/Heuristics wrappers (their ``.fn`` attribute)."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn") or seen > 8:
            raise TypeError(f"fn must be a @triton.jit function; got {type(fn).__name__}")
        fn, seen = fn.fn, seen + 1
    return fn


def _module_names(only: list[str] | None) -> list[str]:
    pkg = importlib.import_module(PACKAGE)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise SystemExit(f"--module names no module of {PACKAGE}: {missing}; have {names}")
        names = [n for n in names if n in only]
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", help="only this module (repeatable)")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90)")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-kernel figures here")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "check_triton_hopper: TRITON_INTERPRET is set; kernels defined in interpreter mode "
            "cannot be compiled. Run without it: env -u TRITON_INTERPRET python ...",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")  # Triton prints its ptxas -v log: the figures
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}: compiling {PACKAGE} kernels for {target}")
    failures: list[str] = []
    compiled = 0
    figures: dict[str, dict] = {}
    for name in _module_names(args.module):
        modname = f"{PACKAGE}.{name}"
        try:
            mod = importlib.import_module(modname)
            specs_fn = getattr(mod, "hopper_compile_specs", None)
            if specs_fn is None:
                raise AttributeError(
                    f"{modname} defines no hopper_compile_specs(): every Triton kernel module must "
                    "list its kernels for the Hopper compile check"
                )
            specs = list(specs_fn())
            if not specs:
                raise ValueError(f"{modname}.hopper_compile_specs() returned no specs")
        except Exception as exc:  # noqa: BLE001 - report and go on with the other modules
            failures.append(f"{modname}: {type(exc).__name__}: {exc}")
            print(f"  FAIL {modname}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue

        covered = set()
        for spec in specs:
            label = f"{name}:{spec.get('name', '?')}"
            try:
                missing = [k for k in REQUIRED_KEYS if k not in spec]
                if missing:
                    raise KeyError(f"spec lacks keys {missing}; has {sorted(spec)}")
                fn = _jit_fn(spec["fn"])
                covered.add(id(fn))
                src = ASTSource(
                    fn=fn,
                    signature=spec["signature"],
                    constexprs=spec["constexprs"],
                    attrs=_attrs(fn, spec.get("aligned", [])),
                )
                start = time.perf_counter()
                log = io.StringIO()
                with contextlib.redirect_stdout(log):
                    kernel = triton.compile(src, target=target, options=spec.get("options"))
                seconds = time.perf_counter() - start
                usage = parse_ptxas_log(log.getvalue())
                source = "triton"
                if usage is None:  # cached compile or a Triton without the log knob
                    usage, source = ptxas_usage(kernel.asm["ptx"], args.arch), "ptxas -v"
                cubin = kernel.asm.get("cubin", b"")
                shared = int(getattr(kernel.metadata, "shared", 0) or 0)
                record = {"seconds": round(seconds, 2), "cubin_bytes": len(cubin), "shared": shared}
                record.update(usage or {})
                record["source"] = source if usage else "unavailable"
                device = _device_figures(kernel)
                if device:
                    record["device"] = device
                figures[label] = record
                problems = []
                if usage is None:
                    problems.append("no ptxas figures (no ptxas log, and ptxas -v on its PTX failed)")
                elif usage["n_spills"] or (device and device["n_spills"]):
                    problems.append(
                        f"spills registers ({usage['spill_stores']} B stores, {usage['spill_loads']} B loads "
                        f"at {usage['n_regs']} registers): shrink its tiles"
                    )
                if shared > MAX_SHARED_BYTES:
                    problems.append(f"needs {shared} B of shared memory > {MAX_SHARED_BYTES} B")
                for instr in spec.get("ptx_contains", []):
                    if instr not in kernel.asm.get("ptx", ""):
                        problems.append(f"its PTX has no {instr} (expected: tensor-core tiles)")
                record["ok"] = not problems
                regs = f"n_regs {usage['n_regs']:>3}  n_spills {usage['n_spills']} B" if usage else "n_regs ?"
                dev = (
                    f"  (loaded: n_regs {device['n_regs']}, n_spills {device['n_spills']})" if device else ""
                )
                verdict = "ok  " if not problems else "FAIL"
                print(
                    f"  {verdict} {label:<42} {seconds:6.2f} s  cubin {len(cubin):>7} B  "
                    f"shared {shared:>6} B  {regs}{dev}"
                )
                if problems:
                    raise RuntimeError("; ".join(problems))
                compiled += 1
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                print(f"  FAIL {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
                traceback.print_exc(limit=3)

        # JIT functions of the module that no spec compiled: kernels someone forgot to list (or
        # device helpers called from kernels, which compile as part of them).
        unlisted = sorted(
            attr
            for attr, value in vars(mod).items()
            if isinstance(value, JITFunction) and id(value) not in covered
        )
        if unlisted:
            print(f"  note {modname}: @triton.jit functions in no spec (fine if device helpers): {unlisted}")

    if args.json is not None:
        args.json.write_text(json.dumps({"target": str(target), "kernels": figures}, indent=2))
    print(f"check_triton_hopper: {compiled} kernel(s) compiled, {len(failures)} failure(s)")
    for line in failures:
        print(f"  - {line}", file=sys.stderr)
    return 1 if failures or compiled == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
