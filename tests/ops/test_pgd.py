"""cbd_fast.ops.pgd_step / pgd_init: every backend against cbd_fast.ops.reference, bit for bit.

"Bit for bit" here: equal values where the reference is a number (so +0 and -0 compare equal: the
reference's own vectorised and scalar clamp paths disagree on the sign of a zero) and NaN exactly
where the reference has NaN. The Triton interpreter (CPU) truncates float32 -> bfloat16/float16
casts, so there 16-bit results may be one ulp off (TOLERANCE_ULPS); float32 stays exact.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cbd_fast.ops import _ext, pgd_init, pgd_step
from cbd_fast.ops.reference import pgd_step_reference

EPS, STEP = 8 / 255, 2 / 255
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Allowed distance to the reference in units in the last place, per (backend, dtype); 0 = exact.
TOLERANCE_ULPS = {("triton-interpreter", torch.bfloat16): 1, ("triton-interpreter", torch.float16): 1}

needs_ext = pytest.mark.skipif(_ext.load() is None, reason=f"extension not built: {_ext.load_error()}")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cpu_backends() -> list[str]:
    return ["torch", "cpp"] if _ext.load() is not None else ["torch"]


def make_inputs(shape, dtype=torch.float32, seed=0, device="cpu", zero_every=7):
    """x_clean in [0, 1], x_adv around it (some outside the ball and the box), grads with zeros."""
    g = torch.Generator().manual_seed(seed)
    xc = torch.rand(shape, generator=g)
    xa = xc + 2 * EPS * (2 * torch.rand(shape, generator=g) - 1)
    grad = torch.randn(shape, generator=g)
    grad.view(-1)[::zero_every] = 0.0
    return tuple(t.to(device=device, dtype=dtype) for t in (xa, grad, xc))


def assert_matches(got: torch.Tensor, want: torch.Tensor, ulps: int = 0) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), f"NaN at {nan_got.sum()} vs {nan_want.sum()} places"
    g, w = got[~nan_want], want[~nan_want]
    if ulps == 0:
        bad = (g != w).nonzero()
        assert bad.numel() == 0, f"{bad.numel()} mismatches, first {g[bad[0]].item()} vs {w[bad[0]].item()}"
    else:
        ulp = torch.finfo(want.dtype).eps * torch.clamp(w.float().abs(), min=torch.finfo(want.dtype).tiny)
        assert ((g.float() - w.float()).abs() <= ulps * ulp * 2).all()


def run_step(backend, xa, grad, xc, step=STEP, eps=EPS, lower=0.0, upper=1.0):
    out = xa.clone()
    res = pgd_step(out, grad, xc, step, eps, lower=lower, upper=upper, backend=backend)
    assert res is out
    want = pgd_step_reference(xa.clone(), grad, xc, step, eps, lower, upper)
    return out, want


# ---- agreement with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3, 5, 7), (4099,)])
def test_matches_reference(backend, dtype, shape):
    xa, grad, xc = make_inputs(shape, dtype)
    out, want = run_step(backend, xa, grad, xc)
    assert_matches(out, want)


@pytest.mark.parametrize("backend", cpu_backends())
def test_large_odd_size(backend):
    xa, grad, xc = make_inputs((2**20 + 3,), torch.float32, seed=3)
    out, want = run_step(backend, xa, grad, xc, step=0.01, eps=0.02)
    assert_matches(out, want)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_scalars_and_boxes(backend, dtype):
    xa, grad, xc = make_inputs((3, 37), dtype, seed=5)
    for step, eps, lo, hi in [
        (1 / 3, 0.1, -0.5, 0.7),
        (0.0, EPS, 0.0, 1.0),
        (STEP, 0.0, 0.0, 1.0),
        (0.1, 0.3, 0.25, 0.75),
        (0.2, 0.2, 0.5, 0.5),
    ]:
        out, want = run_step(backend, xa, grad, xc, step, eps, lo, hi)
        assert_matches(out, want)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_edges_sign_zero_and_nan(backend, dtype):
    nan, inf = float("nan"), float("inf")
    e = 0.25  # exactly representable: the ball edges are exact in every dtype
    xa = torch.tensor([0.5, 0.5, 0.75, 0.25, 1.0, 0.0, nan, 0.5, 0.5, 0.5, -0.0, 0.5, 0.5], dtype=dtype)
    g = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0, -1.0, 1.0, nan, 1.0, -inf, -0.0, 1e-3, -1e-3], dtype=dtype)
    xc = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.5, 0.5, nan, 0.5, 0.0, 0.5, 0.5], dtype=dtype)
    out, want = run_step(backend, xa, g, xc, step=0.125, eps=e)
    assert_matches(out, want)
    # Written out: sign(0) = 0 keeps the point; on the ball edge a step outwards stays on the edge;
    # on the box edge likewise; NaN in x_adv, grad or x_clean gives NaN.
    expect = [0.5, 0.5, 0.75, 0.25, 1.0, 0.0, nan, nan, nan, 0.375, 0.0, 0.625, 0.375]
    assert_matches(out, torch.tensor(expect, dtype=dtype))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_invariants_random(backend, dtype):
    for seed in range(3):
        xa, grad, xc = make_inputs((5, 3, 11, 13), dtype, seed=seed)
        xa = xa * 3 - 1  # starts far outside the ball and the box
        for _ in range(3):
            pgd_step(xa, grad, xc, STEP, EPS, backend=backend)
            grad = torch.randn_like(grad)
        assert xa.min() >= 0 and xa.max() <= 1
        # The ball holds in float32; the final rounding to 16 bits may add half an ulp.
        slack = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
        dist = (xa.float() - xc.float()).abs()
        assert (dist <= torch.tensor(EPS, dtype=torch.float32) * (1 + 1e-6) + slack).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_channels_last(backend):
    xa, grad, xc = make_inputs((2, 3, 5, 7), torch.float32)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (xa, grad, xc)]
    out = cl[0].clone()
    pgd_step(out, cl[1], cl[2], STEP, EPS, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    want = pgd_step_reference(xa.clone(), grad, xc, STEP, EPS)
    assert_matches(out.contiguous(), want)


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_and_leaf_requiring_grad(backend):
    e = torch.empty(0, 3)
    assert pgd_step(e, e.clone(), e.clone(), STEP, EPS, backend=backend) is e
    xa, grad, xc = make_inputs((4, 4))
    leaf = xa.clone().requires_grad_(True)
    pgd_step(leaf, grad, xc, STEP, EPS, backend=backend)  # optimizer-style in-place update
    assert_matches(leaf.detach(), pgd_step_reference(xa.clone(), grad, xc, STEP, EPS))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_native(dtype):
    from cbd_fast.ops.pgd import _native_op

    _native_op()  # registers the fake implementation
    xa, grad, xc = make_inputs((3, 5), dtype)
    torch.library.opcheck(torch.ops.cbd_fast.pgd_step_.default, (xa, grad, xc, 0.1, 0.2, 0.0, 1.0))


@needs_ext
def test_torch_compile_traces_native():
    xa, grad, xc = make_inputs((4, 6))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(a, g, c):
        return pgd_step(a, g, c, 0.1, 0.2, backend="cpp")

    out = xa.clone()
    f(out, grad, xc)
    assert_matches(out, pgd_step_reference(xa.clone(), grad, xc, 0.1, 0.2))


# ---- bad input ---------------------------------------------------------------------------------------


def _bad_cases():
    xa, grad, xc = make_inputs((2, 3, 4, 5))
    t = (xa, grad, xc)
    cl = grad.contiguous(memory_format=torch.channels_last)
    wide = torch.rand(2, 3, 4, 10)[..., ::2]
    ok = dict(step_size=STEP, epsilon=EPS)
    return [
        ((xa.long(), grad, xc), ok, TypeError, "x_adv must be a float32"),
        ((xa.to(torch.complex64), grad, xc), ok, TypeError, "complex64"),
        ((xa, grad.double(), xc), ok, TypeError, "grad must have x_adv's dtype"),
        ((xa, grad, xc.half()), ok, TypeError, "x_clean must have x_adv's dtype"),
        ((xa, grad[:1], xc), ok, ValueError, "grad must have x_adv's shape"),
        ((xa, grad, xc.reshape(2, 3, 20)), ok, ValueError, "x_clean must have x_adv's shape"),
        ((xa, cl, xc), ok, ValueError, "grad must have x_adv's memory layout"),
        ((wide, torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)), ok, ValueError, "x_adv must be dense"),
        ((torch.rand(1, 5).expand(3, 5), torch.rand(3, 5), torch.rand(3, 5)), ok, ValueError, "dense"),
        (("x", grad, xc), ok, TypeError, "x_adv must be a torch.Tensor; got str"),
        (t, dict(step_size=-0.1, epsilon=EPS), ValueError, r"step_size must be >= 0; got -0.1"),
        (t, dict(step_size=STEP, epsilon=-0.5), ValueError, r"epsilon must be >= 0; got -0.5"),
        (t, dict(step_size=math.nan, epsilon=EPS), ValueError, "step_size must be finite; got nan"),
        (t, dict(step_size=STEP, epsilon=math.inf), ValueError, "epsilon must be finite; got inf"),
        (t, dict(ok, lower=1.0, upper=0.0), ValueError, "lower must be <= upper; got lower=1.0, upper=0.0"),
        (t, dict(ok, upper=math.inf), ValueError, "upper must be finite; got inf"),
        (t, dict(step_size="0.1", epsilon=EPS), TypeError, "step_size must be a real number"),
        (t, dict(step_size=True, epsilon=EPS), TypeError, "step_size must be a real number"),
    ]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(backend, case):
    tensors, kwargs, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        pgd_step(*tensors, **kwargs, backend=backend)


def test_partial_overlap_rejected():
    buf = torch.rand(20)
    with pytest.raises(ValueError, match="x_adv partially overlaps grad"):
        pgd_step(buf[:10], buf[5:15], torch.rand(10), STEP, EPS)
    # Exact aliasing is fine (element i is read before it is written).
    x = torch.rand(10)
    xc = x.clone()
    pgd_step(x, x, xc, STEP, EPS)


def test_device_mismatch_meta():
    xa, grad, xc = make_inputs((3,))
    with pytest.raises(ValueError, match="x_clean must be on x_adv's device cpu; got meta"):
        pgd_step(xa, grad, xc.to("meta"), STEP, EPS)


def test_named_backend_unavailable(monkeypatch):
    xa, grad, xc = make_inputs((4,))
    monkeypatch.delenv("CBD_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'cuda'.*cannot serve"):
        pgd_step(xa, grad, xc, STEP, EPS, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'triton'.*TRITON_INTERPRET"):
        pgd_step(xa, grad, xc, STEP, EPS, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        pgd_step(xa, grad, xc, STEP, EPS, backend="fortran")
    monkeypatch.setenv("CBD_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CBD_FAST_BACKEND"):
        pgd_step(xa, grad, xc, STEP, EPS)
    # float64 is served by cpp/torch only: the Triton backend (interpreter) refuses it by name.
    monkeypatch.setenv("CBD_FAST_BACKEND", "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="backend 'triton' serves.*float64"):
        pgd_step(xa.double(), grad.double(), xc.double(), STEP, EPS, backend="triton")


@needs_ext
def test_cpp_checks_are_second_line():
    xa, grad, xc = make_inputs((4,))
    op = torch.ops.cbd_fast.pgd_step_
    with pytest.raises(RuntimeError, match="epsilon must be finite and >= 0; got -1"):
        op(xa, grad, xc, 0.1, -1.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="grad shape"):
        op(xa, grad[:2], xc, 0.1, 0.1, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="x_clean strides"):
        op(
            torch.rand(2, 3, 2, 2),
            torch.rand(2, 3, 2, 2),
            torch.rand(2, 3, 2, 2).contiguous(memory_format=torch.channels_last),
            0.1,
            0.1,
            0.0,
            1.0,
        )


# ---- pgd_init ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_pgd_init_reproducible_and_bounded(dtype):
    x = torch.rand(3, 2, 5, 6).to(dtype)
    x[0] = 0.0
    x[1] = 1.0
    a = pgd_init(x, EPS, generator=torch.Generator().manual_seed(7))
    b = pgd_init(x, EPS, generator=torch.Generator().manual_seed(7))
    c = pgd_init(x, EPS, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == dtype and a.shape == x.shape and not a.requires_grad
    assert a.min() >= 0 and a.max() <= 1
    slack = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    assert ((a.float() - x.float()).abs() <= EPS * (1 + 1e-6) + slack).all()
    # Uniform: the noise covers the ball (inside the box) and is not a constant offset.
    inner = (a.float() - x.float())[2]
    assert inner.min() < -EPS / 2 and inner.max() > EPS / 2


def test_pgd_init_memory_format_and_box():
    x = torch.rand(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    a = pgd_init(x, 0.5, lower=0.25, upper=0.75, generator=torch.Generator().manual_seed(0))
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert a.min() >= 0.25 and a.max() <= 0.75
    b = pgd_init(x.contiguous(), 0.5, lower=0.25, upper=0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # same values whatever the memory format
    assert torch.equal(pgd_init(x, 0.0), x)  # radius 0: the clean images


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(epsilon=-1.0), ValueError, "epsilon must be >= 0; got -1.0"),
        (dict(epsilon=math.nan), ValueError, "epsilon must be finite; got nan"),
        (dict(epsilon=EPS, lower=2.0), ValueError, "lower must be <= upper"),
        (dict(epsilon=EPS, generator=123), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_pgd_init_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pgd_init(torch.rand(2, 3), **kwargs)
    with pytest.raises(TypeError, match="x_clean must be a float32"):
        pgd_init(torch.ones(2, 3, dtype=torch.int32), EPS)
    with pytest.raises(ValueError, match="generator must be on x_clean's device type 'meta'; got cpu"):
        pgd_init(torch.rand(2, 3, device="meta"), EPS, generator=torch.Generator())


# ---- Triton under the interpreter (a subprocess: TRITON_INTERPRET must be set before import) -------

_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from cbd_fast.ops.pgd import pgd_step, _pgd_step_triton_op
    from cbd_fast.ops.reference import pgd_step_reference
    res = {}
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 4097, 9001):
            xc = torch.rand(n, generator=g)
            xa = (xc + 0.06 * (2 * torch.rand(n, generator=g) - 1)).to(dt)
            gr = torch.randn(n, generator=g).to(dt)
            xc = xc.to(dt)
            gr[::5] = 0
            gr[min(3, n - 1)] = float("nan")
            out = xa.clone()
            pgd_step(out, gr, xc, 2 / 255, 8 / 255, backend="triton")
            want = pgd_step_reference(xa.clone(), gr, xc, 2 / 255, 8 / 255)
            nan_ok = torch.equal(torch.isnan(out), torch.isnan(want))
            m = ~torch.isnan(want)
            ulp = torch.finfo(dt).eps * want[m].float().abs().clamp(min=torch.finfo(dt).tiny)
            err = ((out[m].float() - want[m].float()).abs() / ulp).max().item() if m.any() else 0.0
            res[f"{dt}-{n}"] = dict(nan_ok=nan_ok, max_ulp=err, exact=torch.equal(out[m], want[m]))
    x = torch.rand(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    gr = torch.randn_like(x)
    out = x.clone()
    pgd_step(out, gr, x * 0.9, 0.1, 0.05, backend="triton")
    want = pgd_step_reference(x.clone(), gr, x * 0.9, 0.1, 0.05)
    res["channels_last"] = dict(nan_ok=True, max_ulp=0.0, exact=torch.equal(out, want))
    torch.library.opcheck(_pgd_step_triton_op, (x.clone(), gr, x, 0.1, 0.2, 0.0, 1.0))
    res["opcheck"] = dict(nan_ok=True, max_ulp=0.0, exact=True)
    print("RESULT" + json.dumps(res))
    """
)


def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("CBD_FAST_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    for key, r in res.items():
        assert r["nan_ok"], key
        if key.startswith("torch.float32") or key in ("channels_last", "opcheck"):
            assert r["exact"], key
        else:  # interpreter truncates fp32 -> 16-bit casts: at most one ulp (relative, *2 for the
            # binade edge), see TOLERANCE_ULPS
            assert r["max_ulp"] <= 2 * TOLERANCE_ULPS[("triton-interpreter", torch.bfloat16)], (key, r)


# ---- GPU (skipped without one) ---------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 4099, 2**20 + 3])
def test_gpu_matches_reference_bit_exact(backend, dtype, n):
    if backend == "cuda" and not _ext.has_cuda():
        pytest.skip("extension built without CUDA kernels")
    xa, grad, xc = make_inputs((n,), dtype, device="cuda")
    grad[::11] = float("nan")
    out, want = run_step(backend, xa, grad, xc)
    assert_matches(out, want)
    # Misaligned storage (offset by one element): the scalar kernel path.
    base = [torch.cat([t.new_zeros(1), t]) for t in (xa, grad, xc)]
    xa1, grad1, xc1 = (b[1:] for b in base)
    out1, want1 = run_step(backend, xa1, grad1, xc1)
    assert_matches(out1, want1)


@gpu
@needs_cuda
def test_gpu_channels_last_and_subnormals():
    if not _ext.has_cuda():
        pytest.skip("extension built without CUDA kernels")
    xa, grad, xc = make_inputs((4, 3, 9, 9), torch.float32, device="cuda")
    xa[0] = 1e-40  # subnormals survive (no flush to zero despite --use_fast_math)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (xa, grad, xc)]
    for backend in ("cuda", "triton"):
        out = cl[0].clone()
        pgd_step(out, cl[1], cl[2], 1e-41, 1e-39, lower=-1.0, upper=1.0, backend=backend)
        assert_matches(out.contiguous(), pgd_step_reference(xa.clone(), grad, xc, 1e-41, 1e-39, -1.0, 1.0))


_HOPPER_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from cbd_fast.kernels.triton.pgd import hopper_compile_specs
    names = []
    for s in hopper_compile_specs():
        k = triton.compile(triton.compiler.ASTSource(s["fn"], s["signature"], s["constexprs"]),
                           target=GPUTarget("cuda", 90, 32))
        assert "max.NaN.f32" in k.asm["ptx"] and ".ftz" not in k.asm["ptx"], s["name"]
        names.append(s["name"])
    print("NAMES", ",".join(names))
    """
)


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper():
    """Every Triton kernel compiles for sm_90 (no GPU needed); NaN-propagating max, no flush-to-zero."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _HOPPER_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = proc.stdout.split("NAMES", 1)[1].strip().split(",")
    assert names == ["pgd_step_float32", "pgd_step_bfloat16", "pgd_step_float16"]
