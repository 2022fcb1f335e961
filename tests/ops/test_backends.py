"""Backend discovery and dispatch rules (cbd_fast/ops/backends.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import cbd_fast
from cbd_fast.ops import _ext, backends
from cbd_fast.ops.backends import BACKENDS, available_backends, backend_status, select_backend

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CBD_FAST_BACKEND", raising=False)


@pytest.fixture
def no_extension(monkeypatch: pytest.MonkeyPatch) -> str:
    """Pretend the extension failed to load with a recognisable error."""
    error = "ImportError: libfake.so: cannot open shared object file"
    monkeypatch.setattr(_ext, "_state", {"module": None, "error": error})
    return error


def test_backend_names_and_order() -> None:
    assert BACKENDS == ("cuda", "triton", "cpp", "torch")
    assert cbd_fast.available_backends is available_backends
    for dev in ("cpu", "cuda", torch.device("cpu"), "cuda:1", None):
        status = backend_status(dev)
        assert list(status) == list(BACKENDS)
        assert status["torch"] is None
        assert available_backends(dev) == [n for n, r in status.items() if r is None]


def test_torch_always_and_cpp_with_extension() -> None:
    cpu = available_backends("cpu")
    assert cpu[-1] == "torch"
    assert ("cpp" in cpu) == (_ext.load() is not None)
    assert "cuda" not in cpu and "cpp" not in available_backends("cuda")


def test_invalid_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        select_backend("nt_xent", "cpu", "fast")
    with pytest.raises(ValueError, match="got 3"):
        select_backend("nt_xent", "cpu", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority"):
        select_backend("nt_xent", "cpu", None, priority=("cpp", "gpu"))


def test_names_are_case_insensitive() -> None:
    assert select_backend("nt_xent", "cpu", "TORCH") == "torch"


def test_named_unavailable_backend_raises_naming_it_and_why() -> None:
    with pytest.raises(RuntimeError) as info:
        select_backend("nt_xent", "cpu", "cuda")
    msg = str(info.value)
    assert "nt_xent" in msg and "'cuda'" in msg
    assert backend_status("cpu")["cuda"] in msg


def test_missing_extension_reason_reaches_the_error(no_extension: str) -> None:
    assert backend_status("cpu")["cpp"] == f"compiled extension not loaded: {no_extension}"
    assert available_backends("cpu")[-1] == "torch" and "cpp" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match="libfake.so"):
        select_backend("pgd_step", "cpu", "cpp")
    assert select_backend("pgd_step", "cpu") == "torch"  # automatic falls back quietly


def test_extension_import_failure_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str):
        raise OSError(f"{name}: undefined symbol: _ZN3c10fake")

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.delenv("CBD_FAST_DISABLE_EXT", raising=False)
    monkeypatch.setattr(_ext.importlib, "import_module", broken)
    assert _ext.load() is None
    assert _ext.load_error() == "OSError: cbd_fast._C: undefined symbol: _ZN3c10fake"
    assert _ext.has_cuda() is False


def test_disable_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setenv("CBD_FAST_DISABLE_EXT", "1")
    assert _ext.load() is None
    assert "CBD_FAST_DISABLE_EXT" in backend_status("cpu")["cpp"]


def test_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBD_FAST_BACKEND", "torch")
    assert select_backend("nt_xent", "cpu") == "torch"
    assert select_backend("nt_xent", "cpu", "torch") == "torch"
    monkeypatch.setenv("CBD_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CBD_FAST_BACKEND"):
        select_backend("nt_xent", "cpu")
    monkeypatch.setenv("CBD_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"CBD_FAST_BACKEND.*'nope'"):
        select_backend("nt_xent", "cpu")
    # An explicit argument wins over the environment.
    if _ext.load() is not None:
        monkeypatch.setenv("CBD_FAST_BACKEND", "torch")
        assert select_backend("nt_xent", "cpu", "cpp") == "cpp"


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backend_status("cpu")["triton"]
    assert reason is not None
    assert ("TRITON_INTERPRET=1" in reason) if HAS_TRITON else ("not installed" in reason)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_status("cpu")["triton"] is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if HAS_TRITON:
        assert backend_status("cpu")["triton"] is None
        assert select_backend("nt_xent", "cpu", "triton") == "triton"
    # ... and the automatic choice never picks the interpreter.
    assert select_backend("nt_xent", "cpu") in ("cpp", "torch")
    assert select_backend("nt_xent", "cpu", priority=("triton", "torch")) == (
        "triton" if HAS_TRITON else "torch"
    )


def test_triton_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_status("cpu")["triton"] == "the triton package is not installed"
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        select_backend("nt_xent", "cpu", "triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a GPU-less machine")
def test_cuda_tensors_without_gpu() -> None:
    status = backend_status("cuda")
    assert status["cpp"] == "serves CPU tensors only, not 'cuda' tensors"
    if HAS_TRITON:
        assert "no CUDA device" in status["triton"]
    assert select_backend("nt_xent", "cuda") == "torch"


# ---- has_cuda asks the dispatcher, not the build record ------------------------------------------------

needs_ext = pytest.mark.skipif(_ext.load() is None, reason=f"extension not loaded: {_ext.load_error()}")


@pytest.fixture
def fresh_cuda_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    _ext.load()
    monkeypatch.setitem(_ext._state, "cuda_ops", {})


def _register_cuda_kernels(qualnames: list[str]) -> torch.library.Library:
    """Python kernels for the CUDA key of existing cbd_fast ops (the dispatcher cannot tell them apart
    from compiled ones); ``lib._destroy()`` removes them again."""
    lib = torch.library.Library("cbd_fast", "IMPL")
    for q in qualnames:
        lib.impl(q.split("::")[1], lambda *args: None, "CUDA")
    return lib


@needs_ext
def test_has_cuda_follows_the_dispatcher(fresh_cuda_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    if _ext.has_cuda():
        pytest.skip("this build registered its CUDA kernels already")
    assert _ext.has_kernel("cbd_fast::nt_xent_fwd", "CPU")
    assert not _ext.has_kernel("cbd_fast::no_such_op", "CUDA")  # no exception
    lib = _register_cuda_kernels(list(_ext.NATIVE_OPS["nt_xent"]))
    try:
        monkeypatch.setitem(_ext._state, "cuda_ops", {})
        assert _ext.has_cuda("nt_xent")  # although the build record says cuda_compiled False
        assert not _ext.has_cuda("pgd_step") and not _ext.has_cuda()
        assert backend_status("cpu", "nt_xent")["cuda"] == "serves CUDA tensors only, not 'cpu' tensors"
        assert "built without CUDA" in backend_status("cpu", "pgd_step")["cuda"]
    finally:
        lib._destroy()
    monkeypatch.setitem(_ext._state, "cuda_ops", {})
    assert not _ext.has_cuda("nt_xent")
    with pytest.raises(ValueError, match="op must be one of"):
        _ext.has_cuda("conv")


@needs_ext
def test_record_claiming_cuda_without_registered_kernels(
    fresh_cuda_cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cbd_fast.ops import build_info as build_info_module

    record = dict(build_info_module.build_info(), cuda_compiled=True, backends_compiled=["cpp", "cuda"])
    monkeypatch.setattr(build_info_module, "build_info", lambda: dict(record))
    monkeypatch.setattr(_ext, "has_kernel", lambda qualname, key="CUDA": key != "CUDA")
    assert _ext.has_cuda() is False
    reason = backend_status("cuda", "nt_xent")["cuda"]
    assert "no CUDA kernel is registered for cbd_fast::nt_xent_fwd, cbd_fast::nt_xent_bwd" in reason
    assert "stale or mixed build" in reason
    with pytest.raises(RuntimeError, match="no CUDA kernel is registered"):
        select_backend("nt_xent", "cuda", "cuda")


@needs_ext
def test_has_cuda_is_asked_once_per_op(fresh_cuda_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(_ext, "has_kernel", lambda qualname, key="CUDA": asked.append(qualname) or True)
    assert _ext.has_cuda() and _ext.has_cuda("nt_xent") and _ext.has_cuda()
    assert sorted(asked) == sorted(q for qs in _ext.NATIVE_OPS.values() for q in qs)


@pytest.mark.gpu
def test_cuda_device_prefers_native_kernels() -> None:
    expected = "cuda" if _ext.has_cuda() else ("triton" if HAS_TRITON else "torch")
    assert select_backend("nt_xent", "cuda") == expected
