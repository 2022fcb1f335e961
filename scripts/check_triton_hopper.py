#!/usr/bin/env python3
"""Compile every Triton kernel of cbd_fast for Hopper (sm_90) on a machine without a GPU.

Catches GPU code rot in CI: each public module of ``cbd_fast/kernels/triton/`` must define
``hopper_compile_specs() -> list[dict]`` with keys ``name``, ``fn`` (the ``@triton.jit`` kernel),
``signature`` (``{"arg": "*fp32" | "i32" | "fp32" | "constexpr" ...}``) and ``constexprs``
(``{"BLOCK": 128, ...}``), and optionally ``options`` (e.g. ``{"num_warps": 8}``, passed to
``triton.compile``). Each spec is compiled with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))``.

Must run WITHOUT ``TRITON_INTERPRET``: kernels defined in interpreter mode cannot be compiled.

    python scripts/check_triton_hopper.py [--module pgd] [--arch 90]

Exit status: 0 when every kernel compiled; 1 when one failed or a module has no specs; 2 on misuse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cbd_fast.kernels.triton"
REQUIRED_KEYS = ("name", "fn", "signature", "constexprs")


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
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "check_triton_hopper: TRITON_INTERPRET is set; kernels defined in interpreter mode "
            "cannot be compiled. Run without it: env -u TRITON_INTERPRET python ...",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(ROOT))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}: compiling {PACKAGE} kernels for {target}")
    failures: list[str] = []
    compiled = 0
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
                src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
                start = time.perf_counter()
                kernel = triton.compile(src, target=target, options=spec.get("options"))
                seconds = time.perf_counter() - start
                cubin = kernel.asm.get("cubin", b"")
                shared = getattr(kernel.metadata, "shared", "?")
                print(f"  ok   {label:<40} {seconds:6.2f} s  cubin {len(cubin):>7} B  shared {shared} B")
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

    print(f"check_triton_hopper: {compiled} kernel(s) compiled, {len(failures)} failure(s)")
    for line in failures:
        print(f"  - {line}", file=sys.stderr)
    return 1 if failures or compiled == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
