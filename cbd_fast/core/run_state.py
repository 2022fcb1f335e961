"""What a checkpoint of a run holds, and putting it back: the state that makes a resumed run end
with exactly the weights of an uninterrupted one.

A state is a dict of plain data (``torch.load(weights_only=True)`` reads it): format, completed
epochs, model / optimiser / schedule states, the torch, CUDA and data-loader RNG states, the
adversary's state (scanned patches, warp fields), the spike guard's running mean, the history, the
config and the architecture fingerprint. Resuming refuses a checkpoint of another architecture or
another config (fields in ``PurifyConfig.RESUME_SAFE_FIELDS`` may differ).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from cbd_fast.core.checkpoint import CheckpointError
from cbd_fast.core.config import PurifyConfig
from cbd_fast.core.inputs import ImageStream
from cbd_fast.core.prepare import Run

__all__ = ["FORMAT", "capture_state", "restore_state"]

#: the layout version of the state dict
FORMAT = 1


def capture_state(run: Run, history: list[dict[str, float]], stream: ImageStream) -> dict[str, Any]:
    """The run's state after ``len(history)`` completed epochs."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "loader": stream.generator_states()}
    if run.ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.ctx.device)
    return {
        "format": FORMAT,
        "epoch": len(history),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng,
        "adversary": run.adversary.state_dict(),
        **run.guard.state_dict(),  # grad_ema, grad_steps
        "history": history,
        "config": run.config.to_dict(),
        "loss_weights": [run.head_weight, run.clean_weight],
        "fingerprint": run.fingerprint,
    }


def _check_compatible(run: Run, state: dict[str, Any], path: Path) -> None:
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has an unknown checkpoint format {state.get('format')!r}")
    if state.get("fingerprint") != run.fingerprint:
        raise CheckpointError(
            f"{path} was written for another model (architecture fingerprint {state.get('fingerprint')} "
            f"!= {run.fingerprint} of this encoder: different parameter names or shapes)"
        )
    saved, now = state.get("config", {}), run.config.to_dict()
    diff = sorted(
        k for k in now if k not in PurifyConfig.RESUME_SAFE_FIELDS and saved.get(k, now[k]) != now[k]
    )
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diff)
        raise CheckpointError(f"{path} was written with another config ({detail}); resume needs the same")
    saved_weights, weights = state.get("loss_weights"), [run.head_weight, run.clean_weight]
    if saved_weights is not None and list(saved_weights) != weights:
        raise CheckpointError(
            f"{path} was written with the loss weights (head_weight, clean_weight) = {tuple(saved_weights)}, "
            f"this run resolves {tuple(weights)}: the head term needs the same head as the interrupted "
            "run (pass the same head=..., and keep health on: the head is found and verified by it)"
        )


def restore_state(
    run: Run, state: dict[str, Any], path: Path, stream: ImageStream
) -> tuple[int, list[dict[str, float]]]:
    """Put ``state`` (read from ``path``) back into ``run`` and ``stream``.

    Returns:
        (completed epochs, their history).

    Raises:
        CheckpointError: another format, architecture or config.
    """
    _check_compatible(run, state, path)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.guard.load_state_dict(state)
    if "adversary" in state:
        run.adversary.load_state_dict(state["adversary"])
    elif run.adversary.state_dict():
        warnings.warn(
            f"{path} holds no state of the adversary {run.config.adversary!r} (written by an older "
            "version): it starts afresh, so the run will not equal an uninterrupted one",
            RuntimeWarning,
            stacklevel=4,
        )
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if run.ctx.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], run.ctx.device)
    stream.set_generator_states(rng.get("loader", {}))
    return int(state["epoch"]), list(state["history"])
