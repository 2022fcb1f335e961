"""One epoch of the CBD loop: batches through :func:`cbd_step`, running means on the device, the
progress bar, and the checks that turn bad data or a non-finite loss into a clear error.

The loop reads the on-device running losses once every ``log_every`` batches and once at the end
of the epoch (one host sync each), so a GPU is never stalled per step. Each such read also logs a
step: the mean losses of the batches since the previous one (the entry's ``steps``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from cbd_fast.core.inputs import ImageStream
from cbd_fast.core.prepare import Run
from cbd_fast.core.progress import progress
from cbd_fast.core.step import HISTORY_TERMS, NonFiniteLoss, cbd_step

__all__ = ["run_epoch", "show_postfix"]


def show_postfix(bar: Any, means: Any, rate: float) -> None:
    """Progress-bar postfix: running means of (loss, pull, clean, attack) and images/s."""
    bar.set_postfix(
        loss=f"{means[0]:.4f}",
        pull=f"{means[1]:.4f}",
        clean=f"{means[2]:.4f}",
        attack=f"{means[3]:.4f}",
        img_s=f"{rate:.1f}",
    )


def run_epoch(run: Run, stream: ImageStream, epoch: int, last_ckpt: Path | None) -> dict[str, float]:
    """Run epoch ``epoch`` (0-based) over ``stream``; return its history entry.

    Returns:
        ``epoch`` (1-based), the means of ``loss``, ``loss_pull``, ``loss_clean``, ``attack_loss``
        over the images of the epoch, ``lr``, ``images``, ``batches``, ``skipped_batches``,
        ``clipped_batches``, ``dropped_batches`` (a last batch of one image), ``seconds``,
        ``images_per_s``, and ``steps``: a list with one dict per logged step (every ``log_every``
        batches, and the epoch's last ones): ``epoch`` (1-based), ``batch`` (usable batches done in
        the epoch), ``batches`` and ``images`` (in this step's window), the means of ``loss``,
        ``loss_pull``, ``loss_clean``, ``attack_loss`` over the window's images (NaN when all of
        them were skipped), ``seconds`` (since the epoch started) and ``images_per_s`` (the window's).

    Raises:
        ValueError: a data batch outside [0, 1] or NaN/Inf (on accelerators, checked on the device),
            or an epoch with no usable batch.
        RuntimeError: a non-finite loss under ``nonfinite="stop"``, naming the epoch, the batch and
            the last good checkpoint.
    """
    cfg, ctx = run.config, run.ctx
    dev = ctx.device
    n_batches = stream.batches_per_epoch()
    acc = torch.zeros(len(HISTORY_TERMS), device=dev, dtype=torch.float64)
    weight = torch.zeros((), device=dev, dtype=torch.float64)
    skipped = torch.zeros((), device=dev)
    clipped = torch.zeros((), device=dev)
    first_bad = torch.full((), -1, device=dev, dtype=torch.int64)
    bad_data = torch.full((), -1, device=dev, dtype=torch.int64)
    images = dropped = batches = 0
    lr = run.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    bar = progress(
        total=n_batches,
        desc=f"purify {epoch + 1}/{cfg.epochs}",
        unit="batch",
        disable=not (cfg.progress and ctx.dist.is_main),
    )
    where = f"epoch {epoch + 1}/{cfg.epochs}"

    def nonfinite_error(b: int) -> RuntimeError:
        kept = (
            f"the last good checkpoint {last_ckpt} is intact"
            if last_ckpt
            else "no checkpoint was written yet"
        )
        total = f"/{n_batches}" if n_batches else ""
        return RuntimeError(
            f"non-finite loss at {where}, batch {b + 1}{total}: purification stopped ({kept}); "
            "lower lr/epsilon, check the encoder, or set nonfinite='skip' to skip such batches"
        )

    steps: list[dict[str, float]] = []
    # the running sums, counts and time at the previous logged step
    mark: dict[str, Any] = {"totals": torch.zeros(len(HISTORY_TERMS) + 1, dtype=torch.float64)}
    mark.update(batches=0, images=0, t=t0)

    def log_step() -> None:
        """Append the window since the previous logged step (called right after a sync: the extra
        read of the running sums does not stall the device)."""
        if batches <= mark["batches"]:
            return
        totals = torch.cat([acc, weight.reshape(1)]).cpu()
        diff = totals - mark["totals"]
        now = time.perf_counter()
        window_images = images - mark["images"]
        row: dict[str, float] = {"epoch": epoch + 1, "batch": batches, "batches": batches - mark["batches"]}
        row["images"] = window_images
        w = float(diff[-1])
        row.update({k: (float(v) / w if w > 0 else float("nan")) for k, v in zip(HISTORY_TERMS, diff[:-1])})
        row["seconds"] = now - t0
        row["images_per_s"] = window_images / max(now - mark["t"], 1e-9)
        steps.append(row)
        mark.update(totals=totals, batches=batches, images=images, t=now)

    def sync() -> torch.Tensor:
        if int(bad_data) >= 0:
            raise ValueError(
                f"data batch {int(bad_data)} of epoch {epoch + 1} has values outside [0, 1] or NaN/Inf"
            )
        if int(first_bad) >= 0:
            raise nonfinite_error(int(first_bad))
        return (acc / weight.clamp_min(1)).cpu()

    try:
        for b, (x, idx) in enumerate(stream.epoch(epoch)):
            if x.shape[0] * ctx.world < 2:  # NT-Xent needs a negative: drop a final single image
                dropped += 1
                continue
            if dev.type != "cpu" and x.is_floating_point():
                ok = ((x >= 0) & (x <= 1)).all()  # NaN fails both comparisons
                bad_data = torch.where(~ok & (bad_data < 0), torch.full_like(bad_data, b), bad_data)
            try:
                out = cbd_step(run, x, idx, epoch, b / n_batches if n_batches else None)
            except NonFiniteLoss:
                raise nonfinite_error(b) from None
            n = x.shape[0] * ctx.world
            vals = torch.stack([out[k] for k in HISTORY_TERMS]).double()
            keep = (1.0 - out["skipped"]).double() * n
            acc += vals * keep
            weight += keep
            skipped += out["skipped"]
            clipped += out["clipped"]
            if cfg.nonfinite == "stop":
                first_bad = torch.where(
                    ~out["finite"] & (first_bad < 0), torch.full_like(first_bad, b), first_bad
                )
            images += n
            batches += 1
            bar.update(1)
            if (b + 1) % cfg.log_every == 0:
                show_postfix(bar, sync(), images / max(time.perf_counter() - t0, 1e-9))
                log_step()
        means = sync()
        log_step()
        if batches:
            show_postfix(bar, means, images / max(time.perf_counter() - t0, 1e-9))
    finally:
        bar.close()
    if batches == 0:
        raise ValueError(f"data yielded no usable batch in {where} (batches need >= 2 images)")
    seconds = time.perf_counter() - t0
    entry: dict[str, float] = {"epoch": epoch + 1}
    entry.update({k: float(v) for k, v in zip(HISTORY_TERMS, means.tolist())})
    entry.update(
        lr=float(lr),
        images=images,
        batches=batches,
        skipped_batches=int(skipped),
        clipped_batches=int(clipped),
        dropped_batches=dropped,
        seconds=seconds,
        images_per_s=images / max(seconds, 1e-9),
    )
    entry["steps"] = steps  # type: ignore[assignment]
    return entry
