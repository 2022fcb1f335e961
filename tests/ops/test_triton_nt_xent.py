"""The Triton NT-Xent kernels (cbd_fast/kernels/triton/nt_xent.py) at the kernel contract, and the
device guard around every Triton launch.

CPU: under ``TRITON_INTERPRET=1`` (set by tests/conftest.py), the forward (partials over column
splits + log-sum-exp merge) and the backward (direct, or split partials + reduce) against the
float64 contract references ``nt_xent_fwd_reference`` / ``nt_xent_bwd_reference`` of the same
(rounded) inputs: float32, and bfloat16 through the interpreter's float32-upcast branch; odd N (not
a multiple of the 32-row interpreter tile), D not a power of two, temperatures 0.02 .. 5, forced
column splits. The launches are mocked to check that each runs inside the tensors' device guard.
GPU (skipped without one): the same contract on CUDA with real bfloat16 tensor-core dots, and
tensors on ``cuda:1`` while device 0 is current (needs two GPUs).
"""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cbd_fast.ops.backends import backend_status
from cbd_fast.ops.reference import nt_xent_bwd_reference, nt_xent_fwd_reference, pgd_step_reference

TRITON_CPU = backend_status("cpu")["triton"] is None
pytestmark = pytest.mark.skipif(not TRITON_CPU and not torch.cuda.is_available(), reason="triton unavailable")


def _kmod():
    return importlib.import_module("cbd_fast.kernels.triton.nt_xent")


def _unit_rows(n: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    za = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    zb = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    zb[: n // 3] = za[: n // 3] + 0.1 * zb[: n // 3]  # some strong positives
    zb = F.normalize(zb, dim=1)
    return za.to(device=device, dtype=dtype), zb.to(device=device, dtype=dtype)


def _check_contract(za, zb, tau, splits, sides=((True, True), (True, False), (False, True))):
    """Kernel forward/backward vs the float64 contract on the same stored values."""
    k = _kmod()
    inv = 1.0 / tau
    za64, zb64 = za.double().cpu(), zb.double().cpu()
    loss64, lse64 = nt_xent_fwd_reference(za64, zb64, inv)
    loss, lse = k.nt_xent_fwd_triton(za, zb, inv, splits=splits)
    assert loss.dtype == torch.float32 and lse.shape == (2 * za.shape[0],)
    # score sums in float32 (products of 16-bit values are exact): error ~ 1e-7 * |s| <= 1e-7 / tau
    lse_tol = 4e-6 * max(1.0, inv)
    assert (lse.double().cpu() - lse64).abs().max().item() <= lse_tol
    assert abs(loss.item() - loss64.item()) <= lse_tol
    grad = torch.tensor(1.7, device=za.device)
    ga64, gb64 = nt_xent_bwd_reference(grad.double().cpu(), za64, zb64, lse64, inv, True, True)
    scale = max(ga64.abs().max().item(), gb64.abs().max().item())
    # float32: accumulation error; 16-bit: W rounded to the input dtype for W @ u (tensor cores), the
    # interpreter truncating instead of rounding, and the result stored in 16 bits
    rtol = 2e-5 if za.dtype == torch.float32 else 1.6e-2
    for need_a, need_b in sides:
        ga, gb = k.nt_xent_bwd_triton(grad, za, zb, lse, inv, need_a, need_b, splits=splits)
        for need, got, want in ((need_a, ga, ga64), (need_b, gb, gb64)):
            if not need:
                assert got.numel() == 0
                continue
            assert got.dtype == za.dtype and got.shape == za.shape
            err = (got.double().cpu() - want).abs().max().item()
            assert err <= rtol * scale + 1e-7, (need_a, need_b, err, scale)
    return lse


# (N, D, tau): N = 2 (one tile, 2N = 4), N not a multiple of the 32-row tile, D not a power of two,
# D larger than one feature chunk, temperatures from 0.02 (scores up to 50) to 5.
_SHAPES = [(2, 1, 0.5), (3, 3, 0.02), (17, 64, 1.0), (45, 100, 0.1), (33, 130, 5.0)]


@pytest.mark.skipif(not TRITON_CPU, reason="needs the Triton interpreter")
@pytest.mark.parametrize("n,d,tau", _SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreter_contract(n: int, d: int, tau: float, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and (n, d) == (33, 130):
        pytest.skip("the interpreter is slow: the largest shape in float32 only")
    za, zb = _unit_rows(n, d, dtype, seed=n + d)
    _check_contract(za, zb, tau, splits=None)


@pytest.mark.skipif(not TRITON_CPU, reason="needs the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreter_split_columns_agree(dtype: torch.dtype) -> None:
    """1, 2 and 3 column splits (uneven: 3 column tiles) give the same lse and gradients."""
    za, zb = _unit_rows(37, 40, dtype, seed=5)
    lses = [_check_contract(za, zb, 0.2, splits=s, sides=((True, True),)) for s in (1, 2, 3)]
    for other in lses[1:]:
        torch.testing.assert_close(other, lses[0], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not TRITON_CPU, reason="needs the Triton interpreter")
def test_split_choice() -> None:
    k = _kmod()
    # enough row programs for one wave: no split
    assert k._splits(programs=1024, col_tiles=2048, sms=132) == (1, 2048)
    # 2N = 8192 at 128-row tiles on an H200: 64 programs < 132 SMs -> about 2 programs per SM
    splits, per = k._splits(programs=64, col_tiles=128, sms=132)
    assert splits * 64 >= 2 * 132 and splits * per >= 128 and (splits - 1) * per < 128
    assert k._splits(programs=1, col_tiles=3, sms=132) == (3, 1)  # never more splits than tiles
    assert k._splits(programs=8, col_tiles=100, sms=132, cap=2) == (2, 50)  # workspace cap


@pytest.mark.skipif(not TRITON_CPU, reason="needs the Triton interpreter")
def test_block_sizes_keep_the_interpreter_branch_the_only_difference() -> None:
    """GPU 16-bit tiles go to tl.dot as stored; only the interpreter upcasts (UPCAST=interpreting())."""
    import inspect

    k = _kmod()
    src = inspect.getsource(k._mma.fn)
    assert "if UPCAST" in src and "a.to(tl.float32)" in src
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cfg = k.block_sizes(512, dtype, interpret=False)
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"} <= set(cfg["fwd"])
        assert cfg["bwd"]["BLOCK_DV"] >= 64
    for spec in k.hopper_compile_specs():
        if "UPCAST" in spec["constexprs"]:
            assert spec["constexprs"]["UPCAST"] is False, spec["name"]
        if spec["name"].endswith(("bfloat16", "float16")) and "reduce" not in spec["name"]:
            assert spec["ptx_contains"] == ["wgmma.mma_async"], spec["name"]


# ---- the device guard -----------------------------------------------------------------------------


class _GuardSpy:
    """Replaces ``device_guard``: records the device and whether a launch happened inside it."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self.inside = False

    def __call__(self, t: torch.Tensor):
        self.devices.append(t.device)

        @contextlib.contextmanager
        def guard():
            self.inside = True
            try:
                yield
            finally:
                self.inside = False

        return guard()


class _LaunchSpy:
    """Wraps a ``@triton.jit`` kernel: every ``kernel[grid](...)`` must run inside the guard."""

    def __init__(self, kernel, guard: _GuardSpy, name: str, log: list[str]) -> None:
        self.kernel, self.guard, self.name, self.log = kernel, guard, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            assert self.guard.inside, f"{self.name} launched outside the device guard"
            self.log.append(self.name)
            return launch(*args, **kwargs)

        return run


@pytest.mark.skipif(not TRITON_CPU, reason="needs the Triton interpreter")
def test_every_triton_launch_is_inside_the_device_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    k = _kmod()
    pgd_k = importlib.import_module("cbd_fast.kernels.triton.pgd")
    guard, log = _GuardSpy(), []
    for mod in (k, pgd_k):
        monkeypatch.setattr(mod, "device_guard", guard)
    for mod, name in (
        (k, "_fwd_partial_kernel"),
        (k, "_fwd_merge_kernel"),
        (k, "_bwd_kernel"),
        (k, "_bwd_reduce_kernel"),
        (pgd_k, "_pgd_step_kernel"),
    ):
        monkeypatch.setattr(mod, name, _LaunchSpy(getattr(mod, name), guard, name, log))
    za, zb = _unit_rows(20, 8, torch.float32)
    _, lse = k.nt_xent_fwd_triton(za, zb, 2.0, splits=2)
    k.nt_xent_bwd_triton(torch.tensor(1.0), za, zb, lse, 2.0, True, True, splits=2)  # split + reduce
    x = torch.rand(100)
    pgd_k.pgd_step_triton(x, torch.randn(100), x.clone(), 0.01, 0.03, 0.0, 1.0)
    assert log == [
        "_fwd_partial_kernel",
        "_fwd_merge_kernel",
        "_bwd_kernel",
        "_bwd_reduce_kernel",
        "_pgd_step_kernel",
    ]
    assert guard.devices == [za.device, za.device, x.device]


def test_device_guard_targets_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    utils = importlib.import_module("cbd_fast.kernels.triton._utils")
    made: list[object] = []

    class FakeCudaDevice:
        def __init__(self, device) -> None:
            made.append(device)

    monkeypatch.setattr(utils.torch.cuda, "device", FakeCudaDevice)
    guard = utils.device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, FakeCudaDevice) and made == [torch.device("cuda", 1)]
    assert isinstance(utils.device_guard(torch.zeros(1)), contextlib.nullcontext)


# ---- GPU -----------------------------------------------------------------------------------------------


def _triton_cuda_reason() -> str | None:
    return backend_status("cuda")["triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,tau,splits", [(3, 3, 0.05, None), (1000, 130, 0.1, None), (700, 512, 0.5, 3)])
def test_gpu_contract(dtype: torch.dtype, n: int, d: int, tau: float, splits: int | None) -> None:
    if _triton_cuda_reason() is not None:
        pytest.fail(f"triton on CUDA: {_triton_cuda_reason()}")
    za, zb = _unit_rows(n, d, dtype, device="cuda", seed=n)
    _check_contract(za, zb, tau, splits=splits)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (multi-GPU guard test)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tensors_on_the_second_gpu(backend: str) -> None:
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on device 1 (right results, nothing
    allocated on device 0, the current device unchanged)."""
    from cbd_fast.ops import nt_xent, pgd_step
    from cbd_fast.ops.reference import nt_xent_reference

    if backend_status("cuda", "nt_xent")[backend] is not None:
        pytest.fail(f"{backend}: {backend_status('cuda', 'nt_xent')[backend]}")
    torch.cuda.set_device(0)
    torch.cuda.synchronize(0)
    before = torch.cuda.memory_allocated(0)
    dev = torch.device("cuda", 1)
    a = torch.randn(300, 96, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(300, 96, device=dev, dtype=torch.bfloat16)
    loss = nt_xent(a, b, 0.3, backend=backend)
    loss.backward()
    a_ = a.detach().double().requires_grad_(True)
    want = nt_xent_reference(a_, b.double(), 0.3)
    want.backward()
    assert loss.device == dev and a.grad.device == dev
    assert abs(loss.item() - want.item()) < 2e-2
    torch.testing.assert_close(a.grad.double(), a_.grad, rtol=0, atol=2e-2 * a_.grad.abs().max().item())
    xc = torch.rand(1 << 20, device=dev)
    xa, g = (xc + 0.01).clamp(0, 1), torch.randn(1 << 20, device=dev)
    out = xa.clone()
    pgd_step(out, g, xc, 2 / 255, 8 / 255, backend=backend)
    assert torch.equal(out, pgd_step_reference(xa.clone(), g, xc, 2 / 255, 8 / 255))
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == before
