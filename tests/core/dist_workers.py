"""Worker programs that tests/core/test_distributed.py launches with torchrun (2 CPU ranks, gloo).

Usage: ``torchrun --standalone --nproc_per_node=2 tests/core/dist_workers.py MODE OUTDIR [ARGS...]``.
Each rank writes what the test compares to ``OUTDIR/<mode>_rank<R>.pt`` (or prints ``CHECK`` lines).
The module is also imported by the tests for the single-process side of each comparison
(``tiny_encoder``, ``cbd_step``, ``make_data``), so both sides run the very same code.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cbd_fast.core import distributed as cd

# One CBD batch step's settings, shared by both sides of the comparison.
STEP = {"epsilon": 8 / 255, "step_size": 2 / 255, "steps": 2, "temperature": 0.5, "seed": 3, "epoch": 1}
GLOBAL_BATCH = 8


def tiny_encoder(seed: int = 0) -> nn.Module:
    """A small conv encoder with BatchNorm (BN statistics matter for the equivalence): [B,1,8,8] -> [B,6]."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
    )


def make_data(n: int = GLOBAL_BATCH, seed: int = 1) -> torch.Tensor:
    """[n, 1, 8, 8] float32 images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g)


def cbd_step(model: nn.Module, ctx: cd.DistContext, x: torch.Tensor, idx: torch.Tensor) -> dict[str, Any]:
    """One CBD batch step built from the ops and the distributed helpers (no purify.py).

    1. clean anchors (train-mode BN, no grad), gathered once;
    2. K PGD steps in eval mode from per-sample random starts, one gather_local_grad per step;
    3. fine-tune loss nt_xent(f(x_adv), f(x)) on global features (gather_with_grad), backward.
    Returns the loss, parameter gradients, x_adv and BN running statistics.
    """
    from cbd_fast.core.rng import per_sample_uniform, random_start
    from cbd_fast.ops import nt_xent, pgd_step

    s = STEP
    inner = cd.attack_module(model)
    inner.train()
    with torch.no_grad():
        anchors = cd.gather_no_grad(inner(x), ctx)
    inner.eval()
    u = per_sample_uniform(idx, x.shape[1:], seed=s["seed"], epoch=s["epoch"])
    x_adv = random_start(x, u, s["epsilon"])
    attack_losses = []
    for _ in range(s["steps"]):
        x_adv.requires_grad_(True)
        loss_a = nt_xent(cd.gather_local_grad(inner(x_adv), ctx), anchors, s["temperature"])
        (g,) = torch.autograd.grad(loss_a, x_adv)
        x_adv = x_adv.detach()
        pgd_step(x_adv, g, x, s["step_size"], s["epsilon"])
        attack_losses.append(float(loss_a.detach()))
    inner.train()
    za, zc = model(x_adv), model(x)
    loss = nt_xent(cd.gather_with_grad(za, ctx), cd.gather_with_grad(zc, ctx), s["temperature"])
    loss.backward()
    enc = cd.unwrap_model(model)
    return {
        "loss": float(loss.detach()),
        "attack_losses": attack_losses,
        "grads": {n: p.grad.detach().clone() for n, p in enc.named_parameters()},
        "x_adv": x_adv.detach().clone(),
        "buffers": {n: b.detach().clone() for n, b in enc.named_buffers()},
        "bn_classes": sorted({type(m).__name__ for m in enc.modules() if "Norm" in type(m).__name__}),
    }


def _save(outdir: Path, mode: str, ctx: cd.DistContext, obj: Any) -> None:
    torch.save(obj, outdir / f"{mode}_rank{ctx.rank}.pt")


def mode_step(outdir: Path) -> None:
    """The one-step equivalence (sync_bn on and off) and the gathers' gradient contracts."""
    ctx = cd.init_context({"distributed": True, "device": "cpu"})
    out: dict[str, Any] = {"world_size": ctx.world_size, "rank": ctx.rank}
    b = GLOBAL_BATCH // ctx.world_size
    x_all = make_data()
    lo, hi = ctx.rank * b, (ctx.rank + 1) * b
    for sync_bn in (True, False):
        model = cd.wrap_model(tiny_encoder(), ctx, {"sync_bn": sync_bn})
        out[f"sync_bn={sync_bn}"] = cbd_step(model, ctx, x_all[lo:hi], torch.arange(lo, hi))
        out[f"wrapped_type={sync_bn}"] = type(model).__name__

    # gather_with_grad: every rank computes the same loss sum(Z * w): dL/dz_r = W * w[rows of r].
    d = 5
    w = torch.arange(ctx.world_size * b * d, dtype=torch.float32).reshape(-1, d)
    z = torch.randn(b, d, generator=torch.Generator().manual_seed(100 + ctx.rank), requires_grad=True)
    full = cd.gather_with_grad(z, ctx)
    (full * w).sum().backward()
    out["gwg_full"], out["gwg_grad"], out["z"] = full.detach(), z.grad.clone(), z.detach().clone()
    # gather_local_grad: the local slice only, and no collective during backward.
    z2 = z.detach().clone().requires_grad_(True)
    full2 = cd.gather_local_grad(z2, ctx)
    banned = ["all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather"]
    banned += [n for n in ("reduce_scatter_single", "all_gather_single") if hasattr(cd.dist, n)]
    saved = {n: getattr(cd.dist, n) for n in banned}

    def _forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("collective called during gather_local_grad's backward")

    try:
        for n in banned:
            setattr(cd.dist, n, _forbidden)
        (full2 * w).sum().backward()
    finally:
        for n, f in saved.items():
            setattr(cd.dist, n, f)
    out["glg_full"], out["glg_grad"] = full2.detach(), z2.grad.clone()
    with torch.no_grad():
        out["gng_full"] = cd.gather_no_grad(z, ctx)
    _save(outdir, "step", ctx, out)
    cd.shutdown(ctx)


def _report(outdir: Path, rank: int, line: str) -> None:
    """Print ``line`` and append it to ``OUTDIR/report_rank<R>.txt`` (stdout of ranks interleaves)."""
    print(line, flush=True)
    with open(outdir / f"report_rank{rank}.txt", "a") as f:
        f.write(line + "\n")


def _expect(outdir: Path, name: str, ctx: cd.DistContext, fn: Any, exc_type: type[BaseException]) -> None:
    try:
        fn()
    except exc_type as exc:
        _report(outdir, ctx.rank, f"CHECK {name} rank {ctx.rank}: {type(exc).__name__}: {exc}")
    else:
        _report(outdir, ctx.rank, f"CHECK {name} rank {ctx.rank}: NO ERROR")


def mode_errors(outdir: Path) -> None:
    """Bad input: each check must raise the same kind of error on every rank (printed as CHECK lines)."""
    import dataclasses

    from cbd_fast.ops import backends

    @dataclasses.dataclass
    class Cfg:
        batch_size: int = 8
        lr: float = 0.01
        backend: str | None = None
        distributed: Any = True
        device: str = "cpu"

    ctx = cd.init_context(Cfg())
    _expect(outdir, "batch_size", ctx, lambda: cd.local_batch_size(7, ctx), ValueError)
    _expect(outdir, "same_config", ctx, lambda: cd.check_config(Cfg(), ctx), ValueError)  # expect NO ERROR
    _expect(
        outdir,
        "config_mismatch",
        ctx,
        lambda: cd.check_config(Cfg(lr=0.01 * (1 + ctx.rank)), ctx),
        ValueError,
    )
    _expect(outdir, "backend_cuda", ctx, lambda: cd.check_config(Cfg(backend="cuda"), ctx), RuntimeError)
    # A backend only one rank cannot run (rank 1 pretends its extension is missing).
    real_status = backends.backend_status

    def fake_status(device: Any = "cpu", op: str | None = None) -> dict[str, str | None]:
        status = real_status(device, op)
        if ctx.rank == 1:
            status["torch"] = "pretend: unavailable on rank 1"
        return status

    backends.backend_status = fake_status
    try:
        _expect(
            outdir, "backend_one_rank", ctx, lambda: cd.check_config(Cfg(backend="torch"), ctx), RuntimeError
        )
    finally:
        backends.backend_status = real_status
    _expect(outdir, "bad_distributed", ctx, lambda: cd.init_context(Cfg(distributed="yes")), ValueError)
    # The same through purify (raised before any training, on every rank).
    import cbd_fast

    def run(**kw: Any) -> None:
        cbd_fast.purify(tiny_encoder(), purify_data(), **{**PURIFY, **kw})

    _expect(outdir, "purify_batch_size", ctx, lambda: run(batch_size=7), ValueError)
    _expect(outdir, "purify_backend", ctx, lambda: run(backend="cuda"), RuntimeError)
    cd.shutdown(ctx)


def mode_threads(outdir: Path) -> None:
    """The group's worker threads are gone after ``shutdown`` even when purify's modules (which import
    ``torch._dynamo``) are first imported after the group exists; prints ``THREADS`` lines."""
    ctx = cd.init_context({"distributed": True, "device": "cpu"})
    import cbd_fast.core.purify  # noqa: F401  (first import here, after the group exists)

    everyone: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(everyone, {"rank": ctx.rank})
    cd.shutdown(ctx)
    tasks = Path("/proc/self/task")
    names = sorted((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks))
    _report(outdir, ctx.rank, f"THREADS rank {ctx.rank}: {' '.join(names)}")


def mode_crash(outdir: Path, *args: str) -> None:
    """Rank 1 raises inside run_guard while rank 0 waits in collectives: both must stop, not hang.

    With ``linger``, rank 1 catches its error and stays alive (as a user's script might): rank 0 must
    still fail at once (run_guard tore the group down), not wait for rank 1's exit or the timeout.
    """
    if "purify" in args:
        return _crash_in_purify(outdir)
    linger = "linger" in args
    ctx = cd.init_context({"distributed": True, "device": "cpu"})
    t0 = time.monotonic()
    try:
        with cd.run_guard(ctx):
            for step in range(1000):
                if ctx.rank == 1 and step == 3:
                    raise ValueError("boom on rank 1 at step 3")
                t0 = time.monotonic()
                cd.gather_no_grad(torch.ones(2, 3), ctx)
                time.sleep(0.01)
    except Exception as exc:
        if ctx.rank == 0:
            _report(
                outdir, 0, f"CRASH rank 0 stopped {time.monotonic() - t0:.2f}s into its collective: {exc}"
            )
        if linger and ctx.rank == 1:
            time.sleep(30)  # torchrun ends this process once rank 0 has failed
            return
        raise
    print(f"rank {ctx.rank}: finished without error (unexpected)", flush=True)


def _crash_in_purify(outdir: Path) -> None:
    """A NaN image that only rank 1 sees (its first image of global batch 2): rank 1's purify raises
    inside the loop, rank 0 must stop too with rank 1's error."""
    import cbd_fast

    data = purify_data()
    perm = torch.randperm(PURIFY_N, generator=torch.Generator().manual_seed(PURIFY["seed"] + 0))
    bad = int(perm[PURIFY["batch_size"] + 1])  # global batch 1, rank 1's row 0
    assert bad != 0  # item 0 is validated up front on every rank
    data[bad] = float("nan")
    data = list(data)  # a Dataset: items are checked batch by batch, where they land
    rank = int(os.environ["RANK"])
    t0 = time.monotonic()
    try:
        cbd_fast.purify(tiny_encoder(), data, **PURIFY)
    except Exception as exc:
        if rank == 0:
            _report(outdir, 0, f"CRASH rank 0 stopped {time.monotonic() - t0:.2f}s into purify: {exc}")
        raise


#: The purify runs compared across 1 and 2 processes (global batch 8 of 16 images, BN in train mode
#: so the global statistics matter, a learning rate that moves the weights visibly).
PURIFY = {
    # the plain per-sample PGD here; ``purify_settings("default")`` drops it for the default adversary,
    # whose batch split and universal searches are decided on the global batch as well.
    "adversary": "pgd",
    "epochs": 2,
    "batch_size": 8,
    "steps": 2,
    # SGD, not the default Adam: Adam divides each gradient by its own running scale, so a parameter
    # whose gradient is ~0 (below Adam's eps) takes a full step in a direction set by float rounding,
    # which differs between the 2-rank reduction and one process; SGD keeps the comparison at 1e-5.
    # With the "anchor" clean term x 50 (global over ranks), lr 0.002 moves the weights by ~0.38.
    "optimizer": "sgd",
    "clean_weight": 50.0,
    "lr": 0.002,
    "bn_policy": "train",
    "progress": False,
    "device": "cpu",
    "seed": 4,
}
PURIFY_N = 16


def purify_data() -> torch.Tensor:
    return make_data(PURIFY_N, seed=5)


def purify_settings(adversary: str = "pgd") -> dict[str, Any]:
    """``PURIFY`` with ``adversary`` (``"default"``: the library's default adversary and options;
    ``"subset"``: the default adversary on a random half of each batch, with the original's anchors:
    ranks then hold different numbers of attacked images; ``"free"``: the default adversary with
    ``free_replays=2``, its ascent steps taken from the fine-tune's backward; ``"standardised"``: the
    default adversary with ``input_mean`` / ``input_std`` and the reference cache, so that every
    forward, the frozen original's included, goes through the standardisation); ``"head"``: the
    default adversary with a given head guiding the fine-tuning (``head_weight``, ``head_clean``):
    a per-image KL over each rank's own rows, averaged by DDP's gradient mean)."""
    out = dict(PURIFY)
    if adversary == "default":
        del out["adversary"]
    elif adversary == "subset":
        del out["adversary"]
        out.update(adv_fraction=0.5, attack_anchors="original", reference_cache=True)
    elif adversary == "free":
        del out["adversary"]
        out.update(free_replays=2)
    elif adversary == "standardised":
        del out["adversary"]
        out.update(input_mean=(0.4,), input_std=(0.3,), reference_cache=True)
    elif adversary == "head":
        del out["adversary"]
        torch.manual_seed(7)
        out.update(head_weight=1.0, head_clean=True, head=nn.Linear(6, 3))  # ``head`` goes to purify
    else:
        out["adversary"] = adversary
    return out


def mode_purify(outdir: Path, *args: str) -> None:
    """Distributed purify: (A) a 2-epoch run with checkpoints, (B) a resume from A's epoch-1
    checkpoint (as after a crash in epoch 2); rank 0 saves both results; every rank records how
    many checkpoints it wrote (must be 0 except on rank 0). ``args[0]``: the adversary (default
    ``"pgd"``; ``"default"``: the library's default adversary)."""
    import shutil

    settings = purify_settings(args[0] if args else "pgd")

    import cbd_fast
    from cbd_fast.core import checkpoint as ckpt

    rank = int(os.environ["RANK"])
    saves: list[int] = []
    real_save = ckpt.save_checkpoint

    def counting_save(directory: Any, epoch: int, state: Any, **kw: Any) -> Any:
        saves.append(epoch)
        return real_save(directory, epoch, state, **kw)

    ckpt.save_checkpoint = counting_save
    try:
        run_a = cbd_fast.purify(tiny_encoder(), purify_data(), **settings, checkpoint_dir=str(outdir / "ckA"))
        ctx = cd.init_context({"distributed": "auto", "device": "cpu"})
        assert ctx.enabled and ctx.world_size == 2
        cd.dist.barrier()
        if ctx.is_main:
            (outdir / "ckB").mkdir()
            shutil.copy(ckpt.checkpoint_path(outdir / "ckA", 1), ckpt.checkpoint_path(outdir / "ckB", 1))
        cd.dist.barrier()
        run_b = cbd_fast.purify(
            tiny_encoder(), purify_data(), **settings, checkpoint_dir=str(outdir / "ckB"), resume=True
        )
    finally:
        ckpt.save_checkpoint = real_save
    torch.save(
        {
            "A": {k: v.detach().clone() for k, v in run_a.state_dict().items()},
            "B": {k: v.detach().clone() for k, v in run_b.state_dict().items()},
            "saves": saves,
            "bn_classes": sorted({type(m).__name__ for m in run_a.modules() if "Norm" in type(m).__name__}),
        },
        outdir / f"purify_rank{rank}.pt",
    )


def _parse(value: str) -> Any:
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(value, value)


def main(argv: list[str]) -> None:
    mode, outdir = argv[0], Path(argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    modes = {
        "step": mode_step,
        "errors": mode_errors,
        "crash": mode_crash,
        "purify": mode_purify,
        "threads": mode_threads,
    }
    if mode not in modes:
        raise SystemExit(f"unknown mode {mode!r}; choose from {sorted(modes)}")
    modes[mode](outdir, *argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
