"""GPU-only checks of the compiled backends (cuda, triton) beyond numerical agreement on small inputs.

Every test here is marked ``gpu`` (skipped without a CUDA device) and fails, rather than skips,
when a backend it names is unavailable: ``benchmarks/gpu_check.sh`` runs them all on an H200.

- work on a non-default stream really runs on that stream (it would read stale inputs otherwise);
- CUDA-graph capture and replay of ``pgd_step``, ``nt_xent_value_and_grad`` and an autograd
  ``nt_xent`` backward, replayed on new inputs, equal to eager;
- ``torch.compile(fullgraph=True)`` (inductor) of a step calling both ops, forward and backward;
- a ``pgd_step`` over more than 2^31 elements, bit-exact to the torch reference;
- cuda vs triton at 2N = 131072, D = 512 bfloat16 against float64 (all rows' lse and the loss, the
  gradients of a sample of rows).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from cbd_fast.ops import nt_xent, nt_xent_value_and_grad, pgd_step
from cbd_fast.ops.backends import backend_status
from cbd_fast.ops.reference import pgd_step_reference

pytestmark = pytest.mark.gpu
ntx_mod = importlib.import_module("cbd_fast.ops.nt_xent")
BACKENDS = ["cuda", "triton"]
EPS, STEP = 8 / 255, 2 / 255


def _require(backend: str, op: str = "nt_xent") -> None:
    reason = backend_status("cuda", op)[backend]
    if reason is not None:
        pytest.fail(f"backend {backend!r} unavailable on CUDA: {reason}")


def _pgd_inputs(n: int, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xc = torch.rand(n, device="cuda", dtype=dtype, generator=gen)
    xa = (xc + (torch.rand(n, device="cuda", dtype=dtype, generator=gen) - 0.5) * (4 * EPS)).clamp_(0, 1)
    g = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
    g[::7] = 0
    return xa, g, xc


def _views(n: int, d: int, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen)
    b = (a + 0.5 * torch.randn(n, d, device="cuda", dtype=dtype, generator=gen)).to(dtype)
    return a, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_default_stream(backend: str) -> None:
    """Inputs written on stream s behind a long sleep: ops issued on s must wait for them."""
    _require(backend)
    _require(backend, "pgd_step")
    a, b = _views(333, 96)
    xa, g, xc = _pgd_inputs(1 << 20)
    want_loss = nt_xent(a, b, 0.5, backend=backend)
    want_x = pgd_step(xa.clone(), g, xc, STEP, EPS, backend=backend)
    a_s, x_s = torch.zeros_like(a), torch.zeros_like(xa)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on s
        a_s.copy_(a)
        x_s.copy_(xa)
        loss = nt_xent(a_s, b, 0.5, backend=backend)
        pgd_step(x_s, g, xc, STEP, EPS, backend=backend)
    s.synchronize()
    assert torch.equal(loss, want_loss), (loss.item(), want_loss.item())
    assert torch.equal(x_s, want_x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_and_replay(backend: str) -> None:
    _require(backend)
    _require(backend, "pgd_step")
    a, b = _views(256, 128)
    a_req = a.clone().requires_grad_(True)
    xa, g, xc = _pgd_inputs(3 * 2**20 + 5)
    x_adv = xa.clone()

    def body():
        loss, grad_a = nt_xent_value_and_grad(a, b, 0.5, backend=backend)
        (grad_autograd,) = torch.autograd.grad(nt_xent(a_req, b, 0.5, backend=backend), a_req)
        pgd_step(x_adv, g, xc, STEP, EPS, backend=backend)
        return loss, grad_a, grad_autograd

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, the allocator fills, outside the capture
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    for seed in (1, 2):
        new_a, _ = _views(256, 128, seed=seed)
        with torch.no_grad():
            a.copy_(new_a)
            a_req.copy_(new_a)
        x_adv.copy_(xa)
        graph.replay()
        torch.cuda.synchronize()
        want_loss, want_grad = nt_xent_value_and_grad(a, b, 0.5, backend=backend)
        a2 = a.clone().requires_grad_(True)
        (want_autograd,) = torch.autograd.grad(nt_xent(a2, b, 0.5, backend=backend), a2)
        assert torch.equal(out[0], want_loss) and torch.equal(out[1], want_grad)
        assert torch.equal(out[2], want_autograd)
        assert torch.equal(x_adv, pgd_step_reference(xa.clone(), g, xc, STEP, EPS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend: str) -> None:
    _require(backend)
    _require(backend, "pgd_step")
    torch._dynamo.reset()

    def step(a, b, x_adv, g, xc):
        loss = nt_xent(a * 2.0, b, 0.5, backend=backend)
        pgd_step(x_adv, g, xc, STEP, EPS, backend=backend)
        return loss + 1.0

    compiled = torch.compile(step, fullgraph=True)
    a, b = _views(200, 64)
    xa, g, xc = _pgd_inputs(10_001)
    a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    x1, x2 = xa.clone(), xa.clone()
    out = compiled(a1, b, x1, g, xc)
    out.backward()
    want = step(a2, b, x2, g, xc)
    want.backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-2, atol=1e-2 * a2.grad.abs().max().item())
    assert torch.equal(x1, x2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pgd_step_past_2_31_elements_bit_exact(backend: str) -> None:
    """2^31 + 4099 bfloat16 elements (~4.3 GB per tensor): 64-bit indexing in both kernels."""
    _require(backend, "pgd_step")
    n = 2**31 + 4099
    xa, g, xc = _pgd_inputs(n, seed=3)
    out = xa.clone()
    pgd_step(out, g, xc, STEP, EPS, backend=backend)
    torch.cuda.synchronize()
    chunk = 2**28
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        want = pgd_step_reference(xa[i:j].clone(), g[i:j], xc[i:j], STEP, EPS)
        assert torch.equal(out[i:j], want), f"mismatch in elements [{i}, {j})"
    assert not torch.equal(out[-4099:], xa[-4099:])  # the tail past 2^31 was updated


def _lse64(u64: torch.Tensor, inv: float, rows: torch.Tensor | None = None, chunk: int = 4096):
    """float64 lse (all rows or ``rows``) of u64 [2N, D], chunked; plus s_{i,p(i)}."""
    two_n, n = u64.shape[0], u64.shape[0] // 2
    idx = torch.arange(two_n, device=u64.device) if rows is None else rows
    lse = torch.empty(idx.numel(), dtype=torch.float64, device=u64.device)
    pos = torch.empty_like(lse)
    for c0 in range(0, idx.numel(), chunk):
        r = idx[c0 : c0 + chunk]
        s = (u64[r] @ u64.T) * inv
        local = torch.arange(r.numel(), device=u64.device)
        pos[c0 : c0 + chunk] = s[local, (r + n) % two_n]
        s[local, r] = float("-inf")
        lse[c0 : c0 + chunk] = torch.logsumexp(s, dim=1)
    return lse, pos


def test_cuda_vs_triton_at_2n_131072_d_512_bf16() -> None:
    _require("cuda")
    _require("triton")
    n, d, tau = 65536, 512, 0.5
    inv = 1.0 / tau
    a, b = _views(n, d, seed=7)
    za, zb = ntx_mod._normalized(a, "triton"), ntx_mod._normalized(b, "triton")  # the kernels' inputs
    u64 = torch.cat([za, zb]).double()
    lse64, pos64 = _lse64(u64, inv)
    loss64 = (lse64 - pos64).mean().item()
    gen = torch.Generator(device="cuda").manual_seed(0)
    sample = torch.cat([torch.randint(0, n, (96,), device="cuda", generator=gen),
                        torch.randint(n, 2 * n, (96,), device="cuda", generator=gen),
                        torch.tensor([0, n - 1, n, 2 * n - 1], device="cuda")])  # fmt: skip
    # float64 gradient rows of the sample: c * (sum_j W_kj u_j - 2 u_p(k))
    s = (u64[sample] @ u64.T) * inv
    w = torch.exp(s - lse64[sample, None]) + torch.exp(s - lse64[None, :])
    w[torch.arange(sample.numel(), device="cuda"), sample] = 0.0
    grad64 = (inv / (2 * n)) * (w @ u64 - 2.0 * u64[(sample + n) % (2 * n)])
    scale = grad64.abs().max().item()
    one = torch.ones((), device="cuda")
    results = {}
    for backend, fwd, bwd in (
        ("cuda", torch.ops.cbd_fast.nt_xent_fwd, torch.ops.cbd_fast.nt_xent_bwd),
        ("triton", torch.ops.cbd_fast.nt_xent_fwd_triton, torch.ops.cbd_fast.nt_xent_bwd_triton),
    ):
        loss, lse = fwd(za, zb, inv)
        ga, gb = bwd(one, za, zb, lse, inv, True, True)
        torch.cuda.synchronize()
        lse_err = (lse.double() - lse64).abs().max().item()
        # float32 sums of 131072 exponentials: ~1e-5 typical, 3e-4 bounds a sequential accumulation
        assert lse_err <= 3e-4, (backend, lse_err)
        assert abs(loss.item() - loss64) <= 3e-5, (backend, loss.item(), loss64)
        got = torch.cat([ga, gb])[sample].double()
        err = (got - grad64).abs().max().item()
        # bf16 output (2^-9 relative) and, for triton, W rounded to bf16 for the tensor-core W @ u
        assert err <= 1.6e-2 * scale, (backend, err, scale)
        results[backend] = loss.item()
        # the public op end to end (normalisation, autograd) runs and is finite
        a_ = a.clone().requires_grad_(True)
        full = nt_xent(a_, b, tau, backend=backend)
        full.backward()
        assert torch.isfinite(a_.grad).all() and abs(full.item() - loss64) <= 1e-4
    assert abs(results["cuda"] - results["triton"]) <= 5e-5


@pytest.mark.parametrize(
    "two_n,d,dtype,first",
    [
        (1024, 128, torch.bfloat16, "torch"),
        (4096, 256, torch.float32, "torch"),
        (8192, 512, torch.bfloat16, "triton"),
    ],
)
def test_automatic_choice_on_cuda(two_n: int, d: int, dtype: torch.dtype, first: str) -> None:
    """backend=None starts where ``_cuda_order`` says, matches that backend named, and compiles."""
    _require("triton")
    a, b = _views(two_n // 2, d, dtype)
    assert ntx_mod._resolve_backend(a, None) == first
    a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    auto, named = nt_xent(a1, b, 0.5), nt_xent(a2, b, 0.5, backend=first)
    auto.backward()
    named.backward()
    assert torch.allclose(auto, named, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a1.grad.float(), a2.grad.float(), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: nt_xent(x, y, 0.5), fullgraph=True)
    assert torch.allclose(compiled(a, b), named.detach(), rtol=1e-3, atol=1e-3)
