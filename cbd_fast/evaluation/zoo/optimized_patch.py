"""TrojanNN: a patch optimised to excite chosen internal units, then poisoned retraining (``trojannn``).

Y. Liu, S. Ma, Y. Aafer, W.-C. Lee, J. Zhai, W. Wang, X. Zhang, "Trojaning Attack on Neural Networks",
NDSS 2018. Recipe: on an already trained (clean) model, pick a layer and the units in it most strongly
connected to the previous layer (largest sum of absolute incoming weights); optimise the pixels of a
trigger mask region so that the units fire strongly; then retrain the model on trojaned inputs labelled
with the target class plus clean inputs, so the excited units drive the target.

Settings: the chosen layer is the backbone's last ``Linear``/``Conv2d`` (the layer that produces the
features, internal to the classifier; a conv unit's activation is its spatial mean), ``units = 2``; a
``5 x 5`` patch at rows 21-25, columns 2-6 (bottom-left area), pixels ``sigmoid(theta)`` optimised with
Adam (lr 0.1, ``patch_steps = 200``) on 256 training images to maximise the units' mean
pre-activation; retraining: all-to-one poisoning at ``rate`` with the optimised patch, fine-tuning
the clean model for ``retrain_epochs = 1`` epoch with the architecture's recipe. The clean model
trains ``epochs`` epochs first. Deviation: the paper reverse-engineers training data from the model;
here the attacker retrains on the real training set (as in the BackdoorBench re-implementation).

The optimised patch is the trigger's state (``save_trigger`` / ``load_trigger``).

Measured (``FMNISTNet``, seed 1, 3 + 1 epochs on a fixed 6,000-image subset, 2,000 test images): ASR
99.9%, clean ACC 84.0%; the two units' mean pre-activation: 1.72 clean, 1.68 with the initial random
patch, 2.14 with the optimised one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from cbd_fast.evaluation.zoo.patches import PatchTrigger
from cbd_fast.evaluation.zoo.training import BuildJob, ZooBuild, new_model, train_victim

__all__ = [
    "OptimizedPatch",
    "build_trojannn",
    "chosen_layer",
    "most_connected_units",
    "optimise_pasted_pattern",
    "optimize_patch",
]


class OptimizedPatch(PatchTrigger):
    """A ``PatchTrigger`` whose pattern was optimised on a model (so it is saved with the model)."""

    stateful = True


def chosen_layer(backbone: nn.Module) -> nn.Module:
    """The backbone's last ``nn.Linear`` or ``nn.Conv2d`` (in registration order)."""
    layers = [m for m in backbone.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError(f"{type(backbone).__name__} has no Linear or Conv2d layer to attack")
    return layers[-1]


def most_connected_units(layer: nn.Module, k: int) -> torch.Tensor:
    """The [k] int64 output units of ``layer`` with the largest sum of absolute incoming weights."""
    w = layer.weight.detach()
    if not 1 <= k <= w.shape[0]:
        raise ValueError(f"units must be in [1, {w.shape[0]}]; got {k!r}")
    return w.abs().flatten(1).sum(1).topk(k).indices


def _unit_activation(out: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """[N] mean activation of ``units`` in a layer output [N, U] or [N, U, h, w] (spatial mean)."""
    a = out[:, units]
    return a.flatten(1).mean(1) if a.dim() > 2 else a.mean(1)


def optimise_pasted_pattern(
    model: nn.Module,
    score: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    size: int,
    top: int,
    left: int,
    steps: int,
    generator: torch.Generator,
    lr: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Optimise a [C, size, size] patch in [0, 1], pasted at (``top``, ``left``), that maximises the
    mean of ``score(x)`` ([N] per image) over ``images`` [N, C, H, W].

    The pixels are ``sigmoid(theta)``, theta drawn from N(0, 0.25) with ``generator``; Adam at ``lr``
    for ``steps`` steps. ``model`` (which ``score`` runs) is put in eval mode without parameter
    gradients for the duration and is not modified.

    Returns:
        ``(pattern, stats)``: the patch and the mean score on clean, randomly patched (the initial
        patch) and patched images (keys ``clean``, ``initial_patch``, ``final``).
    """
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    theta = (torch.randn(images.shape[1], size, size, generator=generator) * 0.5).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)

    def mean_score(pattern: torch.Tensor | None) -> torch.Tensor:
        x = images
        if pattern is not None:
            x = images.clone()
            x[..., top : top + size, left : left + size] = pattern
        return score(x).mean()

    try:
        with torch.no_grad():
            clean = float(mean_score(None))
            initial = float(mean_score(torch.sigmoid(theta)))
        for _ in range(steps):
            loss = -mean_score(torch.sigmoid(theta))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        pattern = torch.sigmoid(theta.detach())
        with torch.no_grad():
            final = float(mean_score(pattern))
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return pattern, {"clean": clean, "initial_patch": initial, "final": final}


def optimize_patch(
    model: nn.Module,
    layer: nn.Module,
    units: torch.Tensor,
    images: torch.Tensor,
    *,
    size: int,
    top: int,
    left: int,
    steps: int,
    generator: torch.Generator,
    lr: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Optimise a [C, size, size] patch in [0, 1] that maximises ``units`` of ``layer`` on ``images``.

    ``model`` runs in eval mode without parameter gradients and is not modified.

    Returns:
        ``(pattern, stats)``: the patch and the units' mean activation on clean, randomly patched
        (the initial patch) and trojaned images.
    """
    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("out", out))

    def units_fire(x: torch.Tensor) -> torch.Tensor:
        model(x)
        return _unit_activation(captured["out"], units)

    try:
        pattern, stats = optimise_pasted_pattern(
            model, units_fire, images, size=size, top=top, left=left, steps=steps, generator=generator, lr=lr
        )
    finally:
        handle.remove()
    return pattern, {
        "clean": stats["clean"],
        "initial_patch": stats["initial_patch"],
        "trojan": stats["final"],
    }


def build_trojannn(job: BuildJob) -> ZooBuild:
    """Clean training, unit selection, patch optimisation, poisoned fine-tuning (module docstring)."""
    from cbd_fast.evaluation.backdoors import poison_dataset

    cfg = job.settings
    size, top, left = int(cfg["size"]), int(cfg["top"]), int(cfg["left"])
    t0 = time.perf_counter()
    model = new_model(job.arch, job.seed)
    train_victim(job.arch, model, job.train, epochs=job.epochs, seed=job.seed, progress=job.progress)
    clean_seconds = time.perf_counter() - t0
    layer = chosen_layer(model.backbone)
    units = most_connected_units(layer, int(cfg["units"]))
    pick = torch.randperm(len(job.train), generator=job.generator(8))[: int(cfg["patch_images"])]
    pattern, stats = optimize_patch(
        model,
        layer,
        units,
        job.train.images[pick],
        size=size,
        top=top,
        left=left,
        steps=int(cfg["patch_steps"]),
        generator=job.generator(9),
    )
    trigger = OptimizedPatch(pattern=pattern, top=top, left=left, name="trojannn")
    poisoned, index = poison_dataset(job.train, trigger, rate=job.rate, target=job.target, seed=job.seed)
    train_victim(
        job.arch, model, poisoned, epochs=int(cfg["retrain_epochs"]), seed=job.seed + 1, progress=job.progress
    )
    info = {
        "poisoned": len(index),
        "relabelled": len(index),
        "units": units.tolist(),
        "unit_activation": {k: round(v, 4) for k, v in stats.items()},
        "clean_training_seconds": round(clean_seconds, 2),
    }
    return ZooBuild(model, trigger, index, info)
