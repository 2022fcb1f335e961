"""Build cbd_fast and its compiled extension ``cbd_fast._C``.

Flags (environment variables), as a tree:

    CBD_FAST_SKIP_EXT=1          no extension at all: pure-Python install, ops run on the
    |                            PyTorch reference (and Triton where available)
    `-- otherwise the C++ CPU kernels (csrc/kernels/*.h via csrc/torch/*_cpu.cpp) are built, and
        CUDA kernels (csrc/kernels/*.cu, csrc/torch/*_cuda.cpp) are added when:
        |-- CBD_FAST_FORCE_CUDA=1    always (fails, naming CUDA_HOME, when no toolkit is found)
        |-- CBD_FAST_NO_CUDA=1       never
        `-- (default)                torch is a CUDA build and a CUDA toolkit (nvcc) is found
            CBD_FAST_CUDA_ARCHS      e.g. "9.0" or "8.0;9.0"; else TORCH_CUDA_ARCH_LIST; else 9.0
    CBD_FAST_DEBUG=1             -O0 -g instead of -O3
    CBD_FAST_OPT_LEVEL=0..3      host optimisation level (default 3); 0 builds fastest, for
                                 compile/link checks (scripts/check_cuda_extension.sh)
    MAX_JOBS=N                   parallel compile jobs (torch's cpp_extension)

The build writes ``cbd_fast/_build_info.json`` (torch and CUDA versions, archs, which backends
were compiled); ``python -m cbd_fast.info`` shows it. Install without build isolation so the
extension is built against the torch you run: ``pip install --no-build-isolation -e .``
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _write_build_info(record: dict, *dirs: Path) -> None:
    for d in dirs:
        path = d / "cbd_fast" / "_build_info.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


def _base_record() -> dict:
    record = {
        "version": VERSION,
        "python": sys.version.split()[0],
        "build_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "flags": {
            k: os.environ[k]
            for k in sorted(os.environ)
            if k.startswith("CBD_FAST_") or k in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "MAX_JOBS")
        },
    }
    try:
        import torch

        record["torch_version"] = torch.__version__
        record["cuda_version"] = torch.version.cuda
    except ImportError:
        record["torch_version"] = None
        record["cuda_version"] = None
    return record


def _pure_python_setup(reason: str) -> None:
    from setuptools.command.build_py import build_py

    record = {
        **_base_record(),
        "extension_built": False,
        "cuda_compiled": False,
        "backends_compiled": [],
        "cuda_archs": [],
        "note": reason,
    }

    class BuildPy(build_py):
        def run(self):
            super().run()
            _write_build_info(record, ROOT, Path(self.build_lib))

    _setup(ext_modules=[], cmdclass={"build_py": BuildPy})


def _setup(**kwargs) -> None:
    setup(
        packages=find_packages(include=["cbd_fast", "cbd_fast.*"]),
        package_data={"cbd_fast": ["_build_info.json", "evaluation/assets/*"]},
        include_package_data=True,
        **kwargs,
    )


def _toolkit_problem(home: str | None) -> str | None:
    """Why ``home`` is not a usable CUDA toolkit root (None when it is): needs bin/nvcc and headers."""
    if not home:
        return "no CUDA toolkit found (CUDA_HOME unset and no nvcc on PATH)"
    if shutil.which("nvcc", path=os.path.join(home, "bin")) is None:
        return f"CUDA_HOME={home} has no bin/nvcc"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={home} has no include/cuda_runtime.h"
    return None


def _cuda_wanted() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (recorded in the build record)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("CBD_FAST_NO_CUDA"):
        return False, "CBD_FAST_NO_CUDA=1"
    problem = _toolkit_problem(CUDA_HOME)
    if _flag("CBD_FAST_FORCE_CUDA"):
        if problem is not None:
            sys.exit(
                f"cbd_fast: CBD_FAST_FORCE_CUDA=1 but {problem}: set CUDA_HOME to the toolkit's "
                "root (the folder holding bin/nvcc and include/cuda_runtime.h), "
                "e.g. CUDA_HOME=/usr/local/cuda"
            )
        if torch.version.cuda is None:
            sys.exit(
                "cbd_fast: CBD_FAST_FORCE_CUDA=1 but the installed torch "
                f"{torch.__version__} is a CPU-only build: install a CUDA build of torch"
            )
        return True, f"CBD_FAST_FORCE_CUDA=1, torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if problem is not None:
        return False, f"{problem} (set CUDA_HOME to build the CUDA kernels)"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def _cuda_archs() -> list[str]:
    raw = os.environ.get("CBD_FAST_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0"
    archs = [a for a in raw.replace(",", ";").replace(" ", ";").split(";") if a]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)  # what cpp_extension reads
    return archs


def main() -> None:
    if _flag("CBD_FAST_SKIP_EXT"):
        _pure_python_setup("CBD_FAST_SKIP_EXT=1: extension not built")
        return
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _pure_python_setup("torch was not importable at build time: extension not built")
        return

    with_cuda, cuda_why = _cuda_wanted()
    archs = _cuda_archs() if with_cuda else []
    debug = _flag("CBD_FAST_DEBUG")
    level = os.environ.get("CBD_FAST_OPT_LEVEL", "3").strip()
    if level not in ("0", "1", "2", "3"):
        sys.exit(f"cbd_fast: CBD_FAST_OPT_LEVEL must be 0, 1, 2 or 3; got {level!r}")
    opt = ["-O0", "-g"] if debug else [f"-O{level}"]

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern)))  # noqa: E731
    cpu_sources = [p for p in rel("csrc/torch/*.cpp") if not p.endswith("_cuda.cpp")]
    cuda_sources = rel("csrc/torch/*_cuda.cpp") + rel("csrc/kernels/*.cu")
    include_dirs = [str(ROOT / "csrc")]
    # No -std flag: torch's cpp_extension adds the standard its headers need (C++20 for torch >= 2.14,
    # whose headers use `requires`); the torch-free cores in csrc/kernels/ stay C++17 (CMakeLists.txt).
    cxx = [*opt, "-fopenmp", "-DCBD_FAST_WITH_OPENMP"]
    if sys.platform == "darwin":
        cxx.remove("-fopenmp")

    if with_cuda:
        # No --use_fast_math: it flushes denormals and relaxes division in every kernel, which would
        # break the bit-exact PGD step; kernels use fast intrinsics (__expf, ...) explicitly.
        nvcc = [
            *opt,
            "-lineinfo",
            "-DCBD_FAST_WITH_CUDA",
            "--expt-relaxed-constexpr",
        ]
        ext = CUDAExtension(
            "cbd_fast._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": [*cxx, "-DCBD_FAST_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "cbd_fast._C",
            sources=cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=[] if sys.platform == "darwin" else ["-fopenmp"],
        )

    record = {
        **_base_record(),
        "extension_built": True,
        "cuda_compiled": with_cuda,
        "cuda_reason": cuda_why,
        "cuda_archs": archs,
        "backends_compiled": ["cpp", "cuda"] if with_cuda else ["cpp"],
        "debug": debug,
        "opt_flags": opt,
    }

    class BuildExt(BuildExtension):
        def run(self):
            super().run()
            targets = [ROOT]
            if not self.inplace:
                targets.append(Path(self.build_lib))
            _write_build_info(record, *targets)

    _setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)})


if __name__ == "__main__":
    main()
