"""Build a backdoored model for (attack, architecture, seed), and store / reload it.

``build(attack, arch, train, *, seed, epochs=3, rate=0.1, target=0, progress=False) -> (model, trigger)``
is the short form; ``build_record`` also returns the poisoned training indices and the facts of the
build (a ``ZooBuild``). Deterministic for a given seed on one thread. Nothing here draws the defender's
unlabeled set: every random choice comes from the build seed.

Storage (``scripts/train_zoo.py``): ``save_build`` writes ``{stem}.pt`` (the model's float32
state_dict), ``{stem}.trigger.pt`` (stateful attacks) and ``{stem}.json`` (the record, written last);
``load_build`` reads them back without running code from the files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbd_fast.evaluation.backdoors import Trigger
from cbd_fast.evaluation.fmnist import ImageSet
from cbd_fast.evaluation.zoo.base import save_trigger
from cbd_fast.evaluation.zoo.registry import get_attack, load_trigger, resolve_settings, test_trigger
from cbd_fast.evaluation.zoo.training import BuildJob, ZooBuild, new_model

__all__ = ["build", "build_record", "load_build", "save_build", "stem_paths"]


def _check_args(arch: str, train: Any, seed: Any, epochs: Any, rate: Any, target: Any) -> None:
    from cbd_fast.evaluation.architectures import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}; got {arch!r}")
    if not isinstance(train, ImageSet):
        raise TypeError(f"train must be an ImageSet; got {type(train).__name__}")
    if train.images.dim() != 4 or len(train) == 0 or train.images.shape[0] != len(train):
        raise ValueError(
            f"train must hold images [N, C, H, W] and labels [N], N > 0; got {tuple(train.images.shape)} "
            f"and {tuple(train.labels.shape)}"
        )
    for name, value, low in (("seed", seed, 0), ("epochs", epochs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1]; got {rate!r}")
    classes = int(train.labels.max()) + 1
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < max(10, classes):
        raise ValueError(f"target must be a class index in [0, {max(10, classes)}); got {target!r}")


def build_record(
    attack: str,
    arch: str,
    train: ImageSet,
    *,
    seed: int,
    epochs: int = 3,
    rate: float = 0.1,
    target: int = 0,
    progress: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> ZooBuild:
    """Build the backdoored model of ``attack`` on architecture ``arch``: a ``ZooBuild``.

    Args:
        attack: a registered name (``registry.ZOO``).
        arch: an ``architectures.ARCHITECTURES`` name (``"fmnistnet"`` is ``FMNISTNet``).
        train: the clean training set (images [N, 1, 28, 28] float32 in [0, 1], labels [N] int64; not
            modified).
        seed: seed of the model's initialisation, the poisoning draws and the shuffling.
        epochs: epochs of the victim's training (the attack's own phases have their own settings).
        rate: poison rate: share of the training set (for ``label_consistent``, capped at the target
            class; encoder attacks poison no training image).
        target: the target class.
        progress: tqdm progress bars.
        settings: overrides of the attack's settings (``ZOO[attack].settings``), e.g. tiny budgets.

    Returns:
        ``ZooBuild(model, trigger, poisoned_index, info, other_index)``; ``info`` adds ``attack``,
        ``arch``, ``seed``, ``split``, ``kind``, ``epochs``, ``rate``, ``target``, ``n_train``,
        ``settings`` and ``seconds`` to what the attack records.

    Raises:
        ValueError: unknown attack or architecture, bad numbers or settings (the message names them).
    """
    spec = get_attack(attack)
    _check_args(arch, train, seed, epochs, rate, target)
    resolved = resolve_settings(spec, settings)
    job = BuildJob(attack, arch, train, seed, epochs, float(rate), target, progress, resolved)
    t0 = time.perf_counter()
    built = spec.builder(job)
    built.model.eval()
    built.info = {
        "attack": attack,
        "arch": arch,
        "seed": seed,
        "split": spec.split,
        "kind": spec.kind,
        "epochs": epochs,
        "rate": float(rate),
        "target": target,
        "n_train": len(train),
        "settings": resolved,
        **built.info,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return built


def build(
    attack: str,
    arch: str,
    train: ImageSet,
    *,
    seed: int,
    epochs: int = 3,
    rate: float = 0.1,
    target: int = 0,
    progress: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, Trigger]:
    """``(model, test-time trigger)`` of ``build_record`` (same arguments)."""
    built = build_record(
        attack,
        arch,
        train,
        seed=seed,
        epochs=epochs,
        rate=rate,
        target=target,
        progress=progress,
        settings=settings,
    )
    return built.model, built.trigger


def stem_paths(stem: str | os.PathLike[str]) -> dict[str, Path]:
    """``{"model", "trigger", "meta", "lock"}`` paths of a stored build ``{stem}.pt`` etc."""
    stem = Path(stem)
    return {
        "model": stem.with_name(stem.name + ".pt"),
        "trigger": stem.with_name(stem.name + ".trigger.pt"),
        "meta": stem.with_name(stem.name + ".json"),
        "lock": stem.with_name(stem.name + ".lock"),
    }


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_build(
    built: ZooBuild, stem: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write a build: model state_dict (float32), trigger state (stateful attacks), then the JSON record.

    The JSON holds ``built.info``, ``extra`` (e.g. measured ACC/ASR), ``poisoned_index`` and
    ``other_index`` (lists of ints) and ``files``. Every file is written atomically; the JSON last, so
    its presence means the build is complete.
    """
    paths = stem_paths(stem)
    paths["model"].parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in built.model.state_dict().items()}
    _atomic(paths["model"], lambda p: torch.save(state, p))
    attack = built.info.get("attack")
    files = {"model": paths["model"].name}
    if get_attack(attack).stateful:
        save_trigger(built.trigger, paths["trigger"], attack=attack)  # type: ignore[arg-type]
        files["trigger"] = paths["trigger"].name
    record = {
        **built.info,
        **(extra or {}),
        "files": files,
        "poisoned_index": built.poisoned_index.tolist(),
        "other_index": {k: v.tolist() for k, v in built.other_index.items()},
    }
    _atomic(paths["meta"], lambda p: p.write_text(json.dumps(record, indent=1)))
    return paths


def load_build(stem: str | os.PathLike[str]) -> tuple[nn.Module, Trigger, dict[str, Any]]:
    """``(model in eval mode, test-time trigger, record)`` of a build stored by ``save_build``.

    Raises:
        FileNotFoundError: the record or the model file is missing.
        ValueError: a file was refused by the safe loader, or does not match the record.
    """
    from cbd_fast.core.safe_load import UnsafeFileError, torch_load_weights

    paths = stem_paths(stem)
    if not paths["meta"].is_file():
        raise FileNotFoundError(f"no stored build at {str(paths['meta'])!r}")
    record = json.loads(paths["meta"].read_text())
    spec = get_attack(record["attack"])
    try:
        state = torch_load_weights(paths["model"])
    except UnsafeFileError as exc:
        raise ValueError(f"cannot load {str(paths['model'])!r}: {exc}") from exc
    model = new_model(record["arch"], record.get("seed", 0))
    model.load_state_dict(state)
    model.eval()
    if spec.stateful:
        trigger: Trigger = load_trigger(paths["trigger"], attack=spec.name)
    else:
        trigger = test_trigger(spec.name, settings=record.get("settings") or None)
    return model, trigger, record
