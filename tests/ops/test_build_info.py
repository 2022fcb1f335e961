"""The build record agrees with the installed torch and the loaded extension; ``python -m
cbd_fast.app.info`` runs and lists every backend with a reason; setup.py's CUDA decision."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import cbd_fast
from cbd_fast.app.info import format_report
from cbd_fast.ops import _ext
from cbd_fast.ops import build_info as build_info_module
from cbd_fast.ops.backends import BACKENDS

ROOT = Path(__file__).resolve().parents[2]
RECORD = cbd_fast.build_info()
EXT_DISABLED = os.environ.get("CBD_FAST_DISABLE_EXT", "0").strip().lower() not in ("", "0", "false", "no")


def _info(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "cbd_fast.info", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_record_has_the_documented_keys() -> None:
    for key in ("extension_built", "cuda_compiled", "backends_compiled"):
        assert key in RECORD, f"build record lacks {key!r}: {RECORD}"
    if RECORD["extension_built"]:
        for key in (
            "version",
            "python",
            "torch_version",
            "cuda_version",
            "cuda_archs",
            "build_time",
            "flags",
            "cuda_reason",
        ):
            assert key in RECORD, f"build record lacks {key!r}: {RECORD}"


@pytest.mark.skipif(not RECORD["extension_built"], reason="extension not built (pure-Python install)")
def test_record_matches_installed_torch() -> None:
    assert RECORD["version"] == cbd_fast.__version__
    assert RECORD["torch_version"] == torch.__version__, (
        f"extension built against torch {RECORD['torch_version']} but torch {torch.__version__} is "
        "installed: rebuild with `pip install --no-build-isolation -e .`"
    )
    assert RECORD["cuda_version"] == torch.version.cuda
    assert RECORD["python"].split(".")[:2] == [str(sys.version_info.major), str(sys.version_info.minor)]


def test_record_is_self_consistent() -> None:
    compiled = RECORD["backends_compiled"]
    assert set(compiled) <= {"cpp", "cuda"}
    assert ("cpp" in compiled) == RECORD["extension_built"]
    assert ("cuda" in compiled) == RECORD["cuda_compiled"]
    if RECORD["cuda_compiled"]:
        assert RECORD["cuda_version"] is not None
        assert RECORD["cuda_archs"], "CUDA compiled for no architecture"
    else:
        assert RECORD.get("cuda_archs", []) == []


@pytest.mark.skipif(not RECORD["extension_built"] or EXT_DISABLED, reason="extension not built or disabled")
def test_built_extension_loads_and_registers_the_ops() -> None:
    assert _ext.load() is not None, f"extension built but does not load: {_ext.load_error()}"
    assert _ext.load_error() is None
    assert _ext.has_cuda() == RECORD["cuda_compiled"]
    for op in ("nt_xent_fwd", "nt_xent_bwd", "pgd_step_"):
        assert hasattr(torch.ops.cbd_fast, op), f"torch.ops.cbd_fast.{op} is not registered"


def test_build_info_returns_a_copy() -> None:
    first = cbd_fast.build_info()
    first["backends_compiled"].append("mutated")
    assert "mutated" not in cbd_fast.build_info()["backends_compiled"]
    assert build_info_module.build_info() == cbd_fast.build_info()


def test_missing_and_broken_records(tmp_path: Path) -> None:
    missing = build_info_module._read(tmp_path / "nope.json")
    assert missing["extension_built"] is False and "no build record" in missing["note"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    broken = build_info_module._read(bad)
    assert broken["extension_built"] is False and "unreadable" in broken["note"]


def test_info_lists_every_backend_with_reasons() -> None:
    proc = _info()
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "build record:" in text
    for dev in ("cpu", "cuda"):
        assert f"backends for {dev} tensors:" in text
    for name in BACKENDS:
        assert sum(line.split()[:1] == [name] for line in text.splitlines()) == 2, text


def test_info_json_and_interpreter() -> None:
    proc = _info("--json", TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["build"]["extension_built"] == RECORD["extension_built"]
    for dev in ("cpu", "cuda"):
        status = info["backends"][dev]
        assert list(status) == list(BACKENDS)
        assert status["torch"] is None
        for name, reason in status.items():
            assert reason is None or (isinstance(reason, str) and reason), (dev, name, reason)
    # the CPU's bfloat16 support, as oneDNN and torch report it, and the hint the text prints for it
    from cbd_fast.core.purify import cpu_has_native_bf16

    assert info["cpu_bf16"]["native"] is cpu_has_native_bf16()
    assert isinstance(info["cpu_bf16"]["amx"], bool)
    assert not info["cpu_bf16"]["amx"] or info["cpu_bf16"]["native"]  # AMX computes bf16 natively
    for flags, words in (
        ({"native": True, "amx": True}, "AMX"),
        ({"native": True, "amx": False}, "AVX512-BF16"),
        ({"native": False, "amx": False}, "emulated"),
    ):
        line = [x for x in format_report({**info, "cpu_bf16": flags}).splitlines() if x.startswith("CPU bf")]
        assert len(line) == 1 and words in line[0], (flags, line)
    cpu = info["backends"]["cpu"]
    if importlib.util.find_spec("triton") is not None:
        assert cpu["triton"] is None, cpu
    if RECORD["extension_built"] and not EXT_DISABLED:
        assert cpu["cpp"] is None, cpu
        # the instruction set the CPU kernel dispatched to, and the report line that names it
        assert info["cpu_isa"] in ("avx512", "avx2", "baseline"), info["cpu_isa"]
        assert f"(CPU kernels: {info['cpu_isa']})" in format_report(info)
    if not torch.cuda.is_available():
        assert "no CUDA device" in info["backends"]["cuda"]["triton"]


def test_info_shows_why_the_extension_is_missing() -> None:
    proc = _info("--json", CBD_FAST_DISABLE_EXT="1")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "CBD_FAST_DISABLE_EXT" in info["extension_error"]
    assert info["cpu_isa"] is None
    assert "CBD_FAST_DISABLE_EXT" in info["backends"]["cpu"]["cpp"]
    assert "CBD_FAST_DISABLE_EXT" in info["backends"]["cuda"]["cuda"]


# --- setup.py: when CUDA is compiled, and the error when it is forced without a toolkit ----------


def _load_setup() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cbd_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() runs only under __main__
    return mod


@pytest.fixture
def setup_mod(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    for var in ("CBD_FAST_FORCE_CUDA", "CBD_FAST_NO_CUDA"):
        monkeypatch.delenv(var, raising=False)
    return _load_setup()


def test_setup_without_toolkit_builds_cpu_only(setup_mod, monkeypatch, tmp_path) -> None:
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setattr(torch.version, "cuda", "13.0")  # as if torch were a CUDA build
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", None)
    with_cuda, why = setup_mod._cuda_wanted()
    assert not with_cuda and "CUDA_HOME" in why
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", str(tmp_path))  # a folder without bin/nvcc
    with_cuda, why = setup_mod._cuda_wanted()
    assert not with_cuda and "nvcc" in why


def test_setup_cpu_torch_builds_cpu_only(setup_mod, monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with_cuda, why = setup_mod._cuda_wanted()
    assert not with_cuda and "CPU-only" in why
    monkeypatch.setenv("CBD_FAST_NO_CUDA", "1")
    assert setup_mod._cuda_wanted() == (False, "CBD_FAST_NO_CUDA=1")


def test_setup_forced_cuda_without_toolkit_names_cuda_home(setup_mod, monkeypatch) -> None:
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setenv("CBD_FAST_FORCE_CUDA", "1")
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", "/nonexistent")
    with pytest.raises(SystemExit, match="CUDA_HOME"):
        setup_mod._cuda_wanted()


def test_setup_cuda_archs(setup_mod, monkeypatch) -> None:
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)  # restored after the test
    monkeypatch.setenv("CBD_FAST_CUDA_ARCHS", "8.0, 9.0")
    assert setup_mod._cuda_archs() == ["8.0", "9.0"]
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    monkeypatch.delenv("CBD_FAST_CUDA_ARCHS")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert setup_mod._cuda_archs() == ["9.0"]


def test_setup_py_forced_cuda_fails_before_compiling(tmp_path: Path) -> None:
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    env = {**os.environ, "CBD_FAST_FORCE_CUDA": "1", "CUDA_HOME": "/nonexistent"}
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "CUDA_HOME" in proc.stderr, proc.stderr
    assert not (tmp_path / "build").exists()
