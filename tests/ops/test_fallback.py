"""Runtime fallback when a compiled backend fails to compile or launch (cbd_fast/ops/backends.py).

Simulated on the CPU: the Triton interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py) is put
first in the ops' CPU order, and its launchers are monkeypatched to raise the errors a GPU run can
produce (OutOfResources, PTXASError, a launcher build failure, ...). What is checked: the automatic
choice falls back to the next backend with the same result, warns once, records the reason (also
in the log file that ``python -m cbd_fast.info`` reads), skips the failed backend afterwards; a
backend named by argument or ``CBD_FAST_BACKEND`` raises; errors that are not compile/launch
failures are never masked.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from cbd_fast.ops import backends, nt_xent, nt_xent_value_and_grad, pgd_step
from cbd_fast.ops.backends import (
    BackendFallbackWarning,
    backend_status,
    candidate_backends,
    fallback_report,
    format_fallbacks,
    launch_failure_reason,
    run_with_fallback,
)
from cbd_fast.ops.reference import nt_xent_reference, pgd_step_reference

ntx_mod = importlib.import_module("cbd_fast.ops.nt_xent")
pgd_mod = importlib.import_module("cbd_fast.ops.pgd")

CPP = backend_status("cpu")["cpp"] is None
TRITON_CPU = backend_status("cpu")["triton"] is None
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason=f"triton on CPU: {backend_status('cpu')['triton']}")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh failure registry and a private log file for every test."""
    log = tmp_path / "fallbacks.jsonl"
    monkeypatch.setenv(backends.FALLBACK_LOG_ENV, str(log))
    monkeypatch.delenv("CBD_FAST_BACKEND", raising=False)
    backends.reset_fallbacks()
    yield log
    backends.reset_fallbacks()


def _triton_errors():
    pytest.importorskip("triton")
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return OutOfResources, PTXASError, CompilationError


class _Raising:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` raises ``exc`` and counts calls."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.calls = exc, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            raise self.exc

        return launch


def _triton_first(monkeypatch: pytest.MonkeyPatch, *rest: str) -> None:
    """CPU tensors try triton (the interpreter) first, then ``rest``."""
    order = ("triton", *rest)
    monkeypatch.setitem(ntx_mod._ORDER, "cpu", order)
    monkeypatch.setitem(pgd_mod._ORDER, "cpu", order)


def _views(n: int = 9, d: int = 12, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 31 + d)
    return torch.randn(n, d, generator=g).to(dtype), torch.randn(n, d, generator=g).to(dtype)


# ---- which exceptions count --------------------------------------------------------------------------


def test_triton_compile_errors_count() -> None:
    oor, ptxas, compilation = _triton_errors()
    assert launch_failure_reason("triton", oor(232448, 300000, "shared memory")).startswith("compile: ")
    assert launch_failure_reason("triton", ptxas("ptxas fatal")).startswith("compile: ")

    class FrontEndError(compilation):  # its own __init__ needs an AST node; the type is what counts
        def __init__(self, message: str) -> None:
            Exception.__init__(self, message)
            self.message = message

    assert (
        launch_failure_reason("triton", FrontEndError("at 3:4: bad")) == "compile: FrontEndError: at 3:4: bad"
    )
    assert launch_failure_reason("triton", ImportError("libtriton.so: undefined symbol"))
    # not a compiled backend: never falls back
    assert launch_failure_reason("cpp", oor(1, 2, "x")) is None
    assert launch_failure_reason("torch", RuntimeError("too many resources requested for launch")) is None


def _raise_from(path: str, exc: BaseException) -> BaseException:
    """``exc`` raised by code whose file is ``path`` (as if Triton's compiler had raised it)."""
    code = compile("def f(e):\n    raise e\n", path, "exec")
    scope: dict = {}
    exec(code, scope)
    try:
        scope["f"](exc)
    except BaseException as caught:  # noqa: BLE001
        return caught
    raise AssertionError("unreachable")


def test_errors_raised_inside_triton_compiler_count() -> None:
    inside = _raise_from(
        "/site-packages/triton/backends/nvidia/compiler.py", RuntimeError("PassManager::run failed")
    )
    assert launch_failure_reason("triton", inside) == "compile: RuntimeError: PassManager::run failed"
    build = _raise_from("/site-packages/triton/runtime/build.py", subprocess.CalledProcessError(1, ["cc"]))
    assert launch_failure_reason("triton", build).startswith("compile: CalledProcessError")
    # the same error from anywhere else (e.g. our own launcher code) is not a compile failure
    outside = _raise_from(
        "/opt/elsewhere/cbd_fast/kernels/triton/nt_xent.py", RuntimeError("PassManager::run failed")
    )
    assert launch_failure_reason("triton", outside) is None
    # a driver module is not the compiler: only its pre-launch refusals count (below)
    driver = _raise_from("/site-packages/triton/backends/nvidia/driver.py", RuntimeError("boom"))
    assert launch_failure_reason("triton", driver) is None


@pytest.mark.parametrize(
    "message",
    [
        "Triton Error [CUDA]: too many resources requested for launch",
        "nt_xent_fwd (CUDA kernel): launch failed: no kernel image is available for execution on the device",
        "pgd_step_ (CUDA kernel): launch failed: invalid device function",
        "Triton Error [CUDA]: device kernel image is invalid",
        "the provided PTX was compiled with an unsupported toolchain.",
    ],
)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_pre_launch_refusals_count(backend: str, message: str) -> None:
    assert launch_failure_reason(backend, RuntimeError(message)) == f"launch: RuntimeError: {message}"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("Triton Error [CUDA]: misaligned address"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("CUDA error: unspecified launch failure"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
        RuntimeError("nt_xent_fwd (CUDA kernel): launch failed: out of memory"),
        ValueError("za and zb must be [N, D] of one shape"),
        TypeError("bad dtype"),
        AssertionError("wrong values"),
        FloatingPointError("nan"),
        RuntimeError("some other failure"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:24],
)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_faults_and_other_errors_never_count(backend: str, exc: BaseException) -> None:
    assert launch_failure_reason(backend, exc) is None


def test_sticky_error_inside_the_compiler_path_still_does_not_count() -> None:
    # cuModuleLoad (called from triton/compiler/compiler.py) reports an earlier kernel's fault
    exc = _raise_from(
        "/site-packages/triton/compiler/compiler.py",
        RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
    )
    assert launch_failure_reason("triton", exc) is None


def test_missing_cuda_kernel_counts_for_cuda_only() -> None:
    exc = NotImplementedError("Could not run 'cbd_fast::nt_xent_fwd' with arguments from the 'CUDA' backend.")
    assert launch_failure_reason("cuda", exc).startswith("launch: NotImplementedError")
    assert launch_failure_reason("triton", exc) is None


# ---- run_with_fallback, on plain callables -------------------------------------------------------------


def _oor() -> BaseException:
    return _triton_errors()[0](300000, 232448, "shared memory")


def test_run_with_fallback_records_warns_once_and_skips(_isolated: Path) -> None:
    calls: list[str] = []

    def call(name: str) -> str:
        calls.append(name)
        if name == "triton":
            raise _oor()
        return name

    with pytest.warns(BackendFallbackWarning, match=r"'triton' failed to compile .*falling back to 'cuda'"):
        assert (
            run_with_fallback("nt_xent", "cuda:0", torch.bfloat16, ["triton", "cuda", "torch"], call)
            == "cuda"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert (
            run_with_fallback("nt_xent", "cuda:1", torch.bfloat16, ["triton", "cuda", "torch"], call)
            == "cuda"
        )
    assert calls == ["triton", "cuda", "cuda"]  # the failed backend is not tried again
    (rec,) = fallback_report(include_log=False)
    assert (rec["op"], rec["device"], rec["dtype"], rec["backend"], rec["fallback"]) == (
        "nt_xent", "cuda", "bfloat16", "triton", "cuda",
    )  # fmt: skip
    assert rec["reason"].startswith("compile: OutOfResources: out of resource: shared memory")
    # other dtypes and ops keep their own record
    assert backends.failed_backends("nt_xent", "cuda", torch.bfloat16) == {"triton"}
    assert backends.failed_backends("nt_xent", "cuda", torch.float16) == set()
    assert backends.failed_backends("pgd_step", "cuda", torch.bfloat16) == set()
    # the log file holds the record for a later `python -m cbd_fast.info`
    (line,) = _isolated.read_text().splitlines()
    assert json.loads(line)["backend"] == "triton"


def test_named_backend_and_last_backend_raise() -> None:
    def call(name: str) -> str:
        raise _oor()

    with pytest.raises(type(_oor())):
        run_with_fallback("nt_xent", "cuda", torch.float32, ["triton"], call, named=True)
    with pytest.raises(type(_oor())), pytest.warns(BackendFallbackWarning):
        run_with_fallback("nt_xent", "cuda", torch.float32, ["triton", "cuda"], call)  # cuda is last
    assert [r["backend"] for r in fallback_report(include_log=False)] == ["triton"]


def test_other_errors_propagate_and_record_nothing() -> None:
    def call(name: str) -> str:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_with_fallback("pgd_step", "cuda", torch.float32, ["cuda", "triton", "torch"], call)
    assert fallback_report(include_log=False) == []


def test_candidates_skip_failed_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    everything = {"cuda": None, "triton": None, "cpp": "CPU only", "torch": None}
    monkeypatch.setattr(backends, "backend_status", lambda device="cpu", op=None: dict(everything))
    order = ("triton", "cuda", "torch")
    assert candidate_backends("nt_xent", "cuda", priority=order, dtype=torch.bfloat16) == (
        order_list := list(order),
        False,
    )
    backends._record("nt_xent", "cuda", "bfloat16", "triton", "cuda", "compile: x")
    assert candidate_backends("nt_xent", "cuda", priority=order, dtype=torch.bfloat16) == (
        ["cuda", "torch"],
        False,
    )
    assert candidate_backends("nt_xent", "cuda", priority=order, dtype=torch.float32)[0] == order_list
    assert backends.select_backend("nt_xent", "cuda", priority=order, dtype=torch.bfloat16) == "cuda"
    # named: the failed backend is still served (and will raise its error)
    assert candidate_backends("nt_xent", "cuda", "triton", dtype=torch.bfloat16) == (["triton"], True)
    monkeypatch.setenv("CBD_FAST_BACKEND", "triton")
    assert candidate_backends("nt_xent", "cuda", priority=order, dtype=torch.bfloat16) == (["triton"], True)


def test_report_merges_the_log_of_earlier_processes(_isolated: Path) -> None:
    earlier = {
        "op": "pgd_step", "device": "cuda", "dtype": "float16", "backend": "cuda", "fallback": "triton",
        "reason": "launch: RuntimeError: no kernel image is available", "time": "t0", "pid": -1,
    }  # fmt: skip
    _isolated.write_text(json.dumps(earlier) + "\nnot json\n")
    backends._record("nt_xent", "cuda", "bfloat16", "triton", "cuda", "compile: y")
    report = fallback_report()
    assert [(r["backend"], r["source"]) for r in report] == [("cuda", "log"), ("triton", "this process")]
    lines = format_fallbacks(report)
    assert lines[0].startswith("backend fallbacks (2") and "no kernel image" in lines[1]
    assert format_fallbacks([]) == ["backend fallbacks: none recorded"]


def test_log_can_be_disabled_and_unwritable_log_is_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(backends.FALLBACK_LOG_ENV, "0")
    backends._record("nt_xent", "cuda", "bfloat16", "triton", "cuda", "compile: z")
    assert [r["source"] for r in fallback_report()] == ["this process"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(backends.FALLBACK_LOG_ENV, str(blocker / "sub" / "log.jsonl"))  # parent is a file
    backends._record("pgd_step", "cuda", "bfloat16", "triton", "torch", "compile: z")  # no exception


# ---- the ops, with the Triton launchers made to fail -------------------------------------------------------


@needs_triton
def test_nt_xent_falls_back_when_the_triton_forward_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from cbd_fast.kernels.triton import nt_xent as kmod

    _triton_first(monkeypatch, "torch")
    raising = _Raising(_oor())
    monkeypatch.setattr(kmod, "_fwd_partial_kernel", raising)
    a, b = _views()
    a.requires_grad_(True)
    with pytest.warns(BackendFallbackWarning, match="'triton' failed to compile"):
        loss = nt_xent(a, b, 0.3)
    want = nt_xent_reference(a.detach(), b, 0.3)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()  # the torch reference's autograd
    assert a.grad is not None and torch.isfinite(a.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nt_xent(a.detach(), b, 0.3)  # triton skipped: no second warning, no second launch
        nt_xent_value_and_grad(a.detach(), b, 0.3)
    assert raising.calls == 1
    # named: the error is raised, not masked
    with pytest.raises(type(_oor())):
        nt_xent(a.detach(), b, 0.3, backend="triton")
    monkeypatch.setenv("CBD_FAST_BACKEND", "triton")
    with pytest.raises(type(_oor())):
        nt_xent(a.detach(), b, 0.3)
    assert raising.calls == 3


@needs_triton
@pytest.mark.skipif(not CPP, reason="needs the cpp backend")
def test_backward_falls_back_on_the_saved_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward ran on triton; its backward kernel fails: the cpp backward takes za, zb, lse."""
    from cbd_fast.kernels.triton import nt_xent as kmod

    _, ptxas, _ = _triton_errors()
    _triton_first(monkeypatch, "cpp", "torch")
    raising = _Raising(ptxas("ptxas fatal: Unresolved extern function"))
    monkeypatch.setattr(kmod, "_bwd_kernel", raising)
    a, b = _views(11, 19)
    a.requires_grad_(True)
    b.requires_grad_(True)
    loss = nt_xent(a, b, 0.5)  # the triton forward (interpreter) works
    with pytest.warns(BackendFallbackWarning, match="'triton' failed to compile.*falling back to 'cpp'"):
        loss.backward()
    a_, b_ = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    nt_xent_reference(a_, b_, 0.5).backward()
    torch.testing.assert_close(a.grad.double(), a_.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), b_.grad, rtol=1e-4, atol=1e-6)
    assert raising.calls == 1
    assert ntx_mod._resolve_backend(a, None) == "cpp"  # later calls start with cpp


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_falls_back_to_the_torch_contract(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    from cbd_fast.kernels.triton import nt_xent as kmod

    _triton_first(monkeypatch, "torch")
    monkeypatch.setattr(kmod, "_bwd_kernel", _Raising(_oor()))
    a, b = _views(7, 10, dtype)
    a.requires_grad_(True)
    loss = nt_xent(a, b, 0.2)
    with pytest.warns(BackendFallbackWarning, match="falling back to 'torch'"):
        loss.backward()
    a_ = a.detach().double().requires_grad_(True)
    nt_xent_reference(a_, b.double(), 0.2).backward()
    assert b.grad is None and a.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.grad.double(), a_.grad, rtol=tol, atol=tol * a_.grad.abs().max().item())


@needs_triton
def test_value_and_grad_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from cbd_fast.kernels.triton import nt_xent as kmod

    _triton_first(monkeypatch, "torch")
    monkeypatch.setattr(kmod, "_bwd_kernel", _Raising(_oor()))
    a, b = _views(6, 5)
    with pytest.warns(BackendFallbackWarning):
        loss, grad_a = nt_xent_value_and_grad(a, b, 0.4)
    want_loss, want_grad = nt_xent_value_and_grad(a, b, 0.4, backend="torch")
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad_a, want_grad, rtol=1e-5, atol=1e-7)


@needs_triton
def test_launcher_build_failure_falls_back_for_pgd_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C launcher stub cannot be built (no C compiler): pgd_step runs on the next backend,
    x_adv untouched by the failed attempt, bit-exact to the reference."""
    from cbd_fast.kernels.triton import pgd as kmod

    _triton_first(monkeypatch, "cpp", "torch")
    build_error = _raise_from(
        "/site-packages/triton/runtime/build.py",
        RuntimeError("Failed to find C compiler. Please specify via CC environment variable."),
    )
    monkeypatch.setattr(kmod, "_pgd_step_kernel", _Raising(build_error))
    g = torch.Generator().manual_seed(0)
    xc = torch.rand(4099, generator=g)
    xa = xc + 0.05 * (2 * torch.rand(4099, generator=g) - 1)
    grad = torch.randn(4099, generator=g)
    out = xa.clone()
    with pytest.warns(BackendFallbackWarning, match="pgd_step on cpu float32.*'triton' failed to compile"):
        pgd_step(out, grad, xc, 2 / 255, 8 / 255)
    assert torch.equal(out, pgd_step_reference(xa.clone(), grad, xc, 2 / 255, 8 / 255))
    (rec,) = fallback_report(include_log=False)
    assert rec["op"] == "pgd_step" and "Failed to find C compiler" in rec["reason"]
    with pytest.raises(RuntimeError, match="C compiler"):
        pgd_step(xa.clone(), grad, xc, 2 / 255, 8 / 255, backend="triton")


@needs_triton
def test_a_kernel_fault_is_never_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    from cbd_fast.kernels.triton import nt_xent as kmod

    _triton_first(monkeypatch, "torch")
    monkeypatch.setattr(
        kmod, "_fwd_partial_kernel", _Raising(RuntimeError("Triton Error [CUDA]: an illegal memory access"))
    )
    with pytest.raises(RuntimeError, match="illegal memory access"):
        nt_xent(*_views(), 0.5)
    assert fallback_report(include_log=False) == []


@needs_triton
def test_nan_results_are_returned_not_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN is a value, not an error: the backend that produced it stays chosen."""
    _triton_first(monkeypatch, "torch")
    a, b = _views()
    a[0, 0] = float("nan")
    assert torch.isnan(nt_xent(a, b, 0.5))
    assert fallback_report(include_log=False) == []
