"""Kernel fuzzing: ``nt_xent`` and ``pgd_step`` on every available backend against the
reference, with hypothesis: random shapes (1 element .. more than one tile), dtypes, magnitudes
1e-30 .. 1e30, temperatures, layouts and special values. Zero mismatches beyond the documented
tolerance are allowed:

- ``nt_xent``: the tolerance table ``_TOL`` in tests/ops/test_nt_xent.py (float32/float64 vs the
  float64 reference directly; 16-bit judged by the reference's own error in that dtype);
- ``pgd_step``: bit for bit (``assert_matches`` and ``TOLERANCE_ULPS`` of tests/ops/test_pgd.py: one ulp
  for the Triton interpreter's truncating 16-bit casts).

Backends: cpp and torch on CPU tensors; triton under ``TRITON_INTERPRET=1`` (set by tests/conftest.py
before any kernel module is imported) on a small budget; cuda and triton on CUDA tensors when there
is a GPU. float16 magnitudes stay inside float16's range (1e-4 .. 1e4); the others span 1e-30 .. 1e30.
The number of cases run per (op, backend) is printed at the end of the module.

Everything is derandomized (the same cases on every run) with ``deadline=None``.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cbd_fast.ops import nt_xent, nt_xent_value_and_grad, pgd_step
from cbd_fast.ops.backends import backend_status
from cbd_fast.ops.reference import nt_xent_reference, pgd_step_reference
from tests.ops.test_nt_xent import _TOL, _rounding_floor, sixteen_bit_model_errors
from tests.ops.test_pgd import TOLERANCE_ULPS, assert_matches

CPU_BACKENDS = [name for name in ("cpp", "torch") if backend_status("cpu")[name] is None]
TRITON_CPU = backend_status("cpu")["triton"] is None
CUDA = torch.cuda.is_available()
GPU_BACKENDS = [n for n in ("cuda", "triton") if CUDA and backend_status("cuda")[n] is None]

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = {
    "cpp": [F32, F64, BF16, F16],
    "torch": [F32, F64, BF16, F16],
    "triton": [F32, BF16, F16],
    "cuda": [F32, BF16, F16],
}

# hypothesis budgets: (op, backend) -> max_examples. Interpreted Triton is slow: a few cases.
BUDGET = {
    ("nt_xent", "cpp"): 60,
    ("nt_xent", "torch"): 25,
    ("nt_xent", "triton"): 6,
    ("nt_xent_value_and_grad", "cpp"): 30,
    ("nt_xent_value_and_grad", "triton"): 4,
    ("pgd_step", "cpp"): 80,
    ("pgd_step", "torch"): 30,
    ("pgd_step", "triton"): 10,
    ("gpu", "any"): 40,
}
COUNTS: collections.Counter[str] = collections.Counter()


def _settings(key: tuple[str, str]) -> settings:
    return settings(
        max_examples=BUDGET[key],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    line = "fuzz cases run: " + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items()))
    line += f" (total {sum(COUNTS.values())})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(line)
    else:  # pragma: no cover
        print(line)


def _log10_range(dtype: torch.dtype) -> tuple[int, int]:
    return (-4, 4) if dtype == F16 else (-30, 30)


# ---- nt_xent --------------------------------------------------------------------------------------------


@st.composite
def nt_xent_cases(draw: st.DrawFn, backend: str, max_n: int = 80, max_d: int = 150) -> dict:
    """(a64, b64, tau, dtype): float64 views whose dtype-rounded copies are what the kernel gets."""
    dtype = draw(st.sampled_from(DTYPES[backend]))
    n = draw(st.one_of(st.just(2), st.integers(2, max_n)))
    d = draw(st.one_of(st.just(1), st.integers(1, max_d)))
    lo, hi = _log10_range(dtype)
    mag = 10.0 ** draw(st.integers(lo, hi))
    tau = 10.0 ** draw(st.floats(-1.3, 0.7))  # 0.05 .. 5
    kind = draw(st.sampled_from(["randn", "row_scales", "duplicates", "zero_row", "positive", "nonfinite"]))
    transposed = draw(st.booleans())  # hand the kernel a's transpose view (non-contiguous strides)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    a = torch.randn(n, d, generator=g, dtype=F64)
    b = torch.randn(n, d, generator=g, dtype=F64)
    if kind == "row_scales":  # rows spread over two decades either side of the magnitude
        span = 2.0 if dtype != F16 else 1.0
        a = a * 10.0 ** (span * (2 * torch.rand(n, 1, generator=g, dtype=F64) - 1))
    elif kind == "duplicates":  # b's rows equal a's (perfectly aligned positives)
        b = a.clone()
    elif kind == "zero_row":  # a row of zeros stays zero after normalisation
        a[draw(st.integers(0, n - 1))] = 0.0
    elif kind == "positive":  # all features >= 0 (ReLU outputs): large cosine similarities
        a, b = a.abs(), b.abs()
    a, b = (a * mag).to(dtype).to(F64), (b * mag).to(dtype).to(F64)  # exactly what the kernel sees
    if kind == "nonfinite":  # documented: NaN or Inf anywhere in the inputs gives a NaN loss
        (a if draw(st.booleans()) else b)[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
    # a row scaled past the dtype's range (float16 row_scales near 1e4) is an Inf input too
    nonfinite = not (torch.isfinite(a).all() and torch.isfinite(b).all())
    return {
        "a": a,
        "b": b,
        "tau": tau,
        "dtype": dtype,
        "nonfinite": nonfinite,
        "transposed": transposed,
        "desc": f"N={n} D={d} {dtype} mag=1e{math.log10(mag):+.0f} tau={tau:.3g} {kind}"
        + (" transposed" if transposed else ""),
    }


def _reference_grads(a: torch.Tensor, b: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
    a_ = a.detach().clone().requires_grad_(True)
    b_ = b.detach().clone().requires_grad_(True)
    loss = nt_xent_reference(a_, b_, tau)
    ga, gb = torch.autograd.grad(loss, (a_, b_))
    return loss.detach(), ga, gb


def _err(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x.double() - y.double()).abs().max().item()


def _check_against_reference(
    got: tuple[torch.Tensor, ...], case: dict, names: tuple[str, ...], backend: str
) -> None:
    """``got`` = (loss, grad_a[, grad_b]) of the kernel vs the float64 reference, by ``_TOL``."""
    a, b, tau, dtype = case["a"], case["b"], case["tau"], case["dtype"]
    if case["nonfinite"]:
        assert torch.isnan(got[0]), f"{backend} {case['desc']}: loss {got[0].item()} for non-finite inputs"
        return
    want = _reference_grads(a, b, tau)[: len(got)]
    masks = {}
    for name, g, w in zip(names, got, want):
        # Non-finite only where the exact value is not representable in the output dtype (the
        # gradient of a zero row is dL/dz / NORM_EPS, e.g. ~1e11: inf in float16).
        representable = torch.isfinite(w.to(g.dtype))
        assert torch.isfinite(g)[representable].all(), f"{backend} {case['desc']}: non-finite {name}"
        if not representable.all():
            assert torch.equal(torch.isinf(g), ~representable), (
                f"{backend} {case['desc']}: {name} inf pattern"
            )
            g.masked_fill_(~representable, 0.0)
            w.masked_fill_(~representable, 0.0)
        masks[name] = ~representable
    tol = _TOL[dtype]
    floors = {"loss": 0.0, "grad_a": _rounding_floor(a, tau, dtype), "grad_b": _rounding_floor(b, tau, dtype)}
    if "factor" in tol:  # 16-bit: judged by the error the format itself costs (see test_nt_xent)
        model = sixteen_bit_model_errors(backend, a, b, tau, dtype, tuple(want), masks)
        eps = torch.finfo(dtype).eps
        for name, g, w in zip(names, got, want):
            scale = 1.0 / tau if name == "loss" else w.abs().max().item()
            bound = tol["factor"] * model[name] + tol["atol"] * eps * scale + floors[name]
            assert _err(g, w) <= bound, f"{backend} {case['desc']} {name}: err {_err(g, w):.3g} > {bound:.3g}"
        return
    assert _err(got[0], want[0]) <= tol["loss_atol"] / tau, (
        f"{backend} {case['desc']} loss: {got[0].item()!r} vs reference {want[0].item()!r}"
    )
    for name, g, w in zip(names[1:], got[1:], want[1:]):
        bound = tol["grad_rtol"] * w.abs().max().item() + tol["grad_atol"] / tau + floors[name]
        assert _err(g, w) <= bound, f"{backend} {case['desc']} {name}: err {_err(g, w):.3g} > {bound:.3g}"


def _run_nt_xent(case: dict, backend: str, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    a = case["a"].to(device=device, dtype=case["dtype"])
    b = case["b"].to(device=device, dtype=case["dtype"]).requires_grad_(True)
    if case["transposed"]:  # a leaf of shape [D, N]; the op sees its [N, D] transpose view
        leaf = a.t().contiguous().requires_grad_(True)
        a_in = leaf.t()
    else:
        leaf = a_in = a.requires_grad_(True)
    loss = nt_xent(a_in, b, case["tau"], backend=backend)
    assert loss.shape == () and loss.dtype == (F64 if case["dtype"] == F64 else F32)
    loss.backward()
    grad_a = leaf.grad.t() if case["transposed"] else leaf.grad
    return loss.detach().cpu(), grad_a.cpu(), b.grad.cpu()


def _fuzz_nt_xent(backend: str, max_n: int = 80, max_d: int = 150):
    @_settings(("nt_xent", backend))
    @given(case=nt_xent_cases(backend, max_n, max_d))
    def run(case: dict) -> None:
        COUNTS[f"nt_xent/{backend}"] += 1
        _check_against_reference(_run_nt_xent(case, backend), case, ("loss", "grad_a", "grad_b"), backend)

    run()


def _fuzz_value_and_grad(backend: str, max_n: int = 80, max_d: int = 150):
    @_settings(("nt_xent_value_and_grad", backend))
    @given(case=nt_xent_cases(backend, max_n, max_d))
    def run(case: dict) -> None:
        COUNTS[f"nt_xent_value_and_grad/{backend}"] += 1
        a, b = case["a"].to(case["dtype"]), case["b"].to(case["dtype"])
        if case["transposed"]:
            a = a.t().contiguous().t()
        loss, grad_a = nt_xent_value_and_grad(a, b, case["tau"], backend=backend)
        assert grad_a.dtype == case["dtype"] and grad_a.shape == a.shape
        _check_against_reference((loss, grad_a), case, ("loss", "grad_a"), backend)

    run()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_nt_xent_cpu(backend: str) -> None:
    _fuzz_nt_xent(backend)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="cpp backend unavailable")
def test_fuzz_nt_xent_value_and_grad_cpp() -> None:
    _fuzz_value_and_grad("cpp")


@pytest.mark.skipif(not TRITON_CPU, reason=f"triton on CPU unavailable: {backend_status('cpu')['triton']}")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's "All-NaN slice" on the NaN-input cases
def test_fuzz_nt_xent_triton_interpreter() -> None:
    _fuzz_nt_xent("triton", max_n=72, max_d=140)
    _fuzz_value_and_grad("triton", max_n=40, max_d=70)


# ---- pgd_step -------------------------------------------------------------------------------------------


@st.composite
def pgd_cases(draw: st.DrawFn, backend: str, max_numel: int = 40_000) -> dict:
    """x_adv, grad, x_clean (same shape, dtype, layout) and the four scalars."""
    dtype = draw(st.sampled_from(DTYPES[backend]))
    shape = tuple(draw(st.lists(st.integers(1, 48), min_size=1, max_size=4)))
    if draw(st.booleans()):  # make sure sizes past one tile (triton 4096, cpp grain 32768) show up
        shape = (draw(st.integers(4097, max_numel)),)
    assume(math.prod(shape) <= max_numel)
    lo, hi = _log10_range(dtype)
    mag = 10.0 ** draw(st.integers(lo, hi))
    eps = mag * draw(st.sampled_from([0.0, 1e-3, 0.03, 0.5, 2.0]))
    step = mag * draw(st.sampled_from([0.0, 1e-3, 0.01, 0.3, 5.0]))
    box = draw(st.sampled_from(["unit", "wide", "tight", "point"]))
    lower, upper = {
        "unit": (0.0, 1.0),
        "wide": (-mag * 10, mag * 10),
        "tight": (0.2 * mag, 0.6 * mag),
        "point": (0.5 * mag, 0.5 * mag),
    }[box]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    xc = torch.rand(shape, generator=g, dtype=F64) * mag
    xa = xc + (eps + mag * 0.01) * (
        4 * torch.rand(shape, generator=g, dtype=F64) - 2
    )  # some outside the ball
    grad = torch.randn(shape, generator=g, dtype=F64) * 10.0 ** draw(st.integers(-30, 30))
    special = draw(st.sampled_from(["none", "zeros", "nan_grad", "nan_x", "tiny_grad"]))
    flat = grad.view(-1)
    if special == "zeros":
        flat[::3] = 0.0
    elif special == "nan_grad":
        flat[:: max(1, flat.numel() // 5)] = float("nan")
    elif special == "nan_x":
        xa.view(-1)[0] = float("nan")
    elif special == "tiny_grad":
        flat.mul_(1e-300)  # zero in every dtype after rounding, or denormal in float64
    x_adv, grad, x_clean = (t.to(dtype) for t in (xa, grad, xc))
    if len(shape) == 4 and draw(st.booleans()):
        x_adv, grad, x_clean = (
            t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x_clean)
        )
    desc = f"shape={shape} {dtype} mag=1e{math.log10(mag):+.0f} eps={eps:.3g} step={step:.3g} {box} {special}"
    return {
        "x_adv": x_adv,
        "grad": grad,
        "x_clean": x_clean,
        "step": step,
        "eps": eps,
        "lower": lower,
        "upper": upper,
        "dtype": dtype,
        "desc": desc,
    }


def _check_pgd(case: dict, backend: str, device: str = "cpu") -> None:
    want = case["x_adv"].clone()
    pgd_step_reference(
        want, case["grad"], case["x_clean"], case["step"], case["eps"], case["lower"], case["upper"]
    )
    x_adv, grad, x_clean = (case[k].to(device) for k in ("x_adv", "grad", "x_clean"))
    strides = x_adv.stride()
    out = pgd_step(
        x_adv,
        grad,
        x_clean,
        case["step"],
        case["eps"],
        lower=case["lower"],
        upper=case["upper"],
        backend=backend,
    )
    assert out is x_adv and x_adv.stride() == strides
    key = "triton-interpreter" if backend == "triton" and device == "cpu" else backend
    try:
        assert_matches(x_adv.cpu(), want, TOLERANCE_ULPS.get((key, case["dtype"]), 0))
    except AssertionError as e:
        raise AssertionError(f"{backend} {case['desc']}: {e}") from None


def _fuzz_pgd(backend: str, max_numel: int = 40_000) -> None:
    @_settings(("pgd_step", backend))
    @given(case=pgd_cases(backend, max_numel))
    def run(case: dict) -> None:
        COUNTS[f"pgd_step/{backend}"] += 1
        _check_pgd(case, backend)

    run()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_pgd_step_cpu(backend: str) -> None:
    _fuzz_pgd(backend)


@pytest.mark.skipif(not TRITON_CPU, reason=f"triton on CPU unavailable: {backend_status('cpu')['triton']}")
def test_fuzz_pgd_step_triton_interpreter() -> None:
    _fuzz_pgd("triton", max_numel=20_000)


# ---- GPU backends (skipped without a CUDA device) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device with the cuda or triton backend")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fuzz_gpu_backends(backend: str) -> None:
    if backend not in GPU_BACKENDS:
        pytest.skip(f"{backend} unavailable on CUDA: {backend_status('cuda')[backend]}")

    @_settings(("gpu", "any"))
    @given(case=nt_xent_cases(backend, max_n=300, max_d=300), pcase=pgd_cases(backend, max_numel=200_000))
    def run(case: dict, pcase: dict) -> None:
        COUNTS[f"gpu/{backend}"] += 1
        _check_against_reference(
            _run_nt_xent(case, backend, "cuda"), case, ("loss", "grad_a", "grad_b"), backend
        )
        _check_pgd(pcase, backend, "cuda")

    run()
