"""What every zoo trigger shares: input checks, the [0, 1] clamp, and saving a trigger's state.

A trigger is a callable ``images [N, C, H, W] float in [0, 1] -> triggered images`` (a new tensor of the
same shape and dtype, in [0, 1]; the input is never modified). ``ZooTrigger`` extends
``cbd_fast.evaluation.backdoors.Trigger`` so the zoo's triggers go wherever the dev ones go
(``poison_dataset``, ``attack_success_rate``, ``plant_feature_backdoor``).

A trigger with learned or optimised parts (a generator network, an optimised patch) is *stateful*: its
``config()`` (JSON-able scalars: how to rebuild it) and ``state_dict()`` (tensors: what was learned)
are written by ``save_trigger`` to a file next to the model, so the attack success rate can be measured
later in another process (``cbd_fast.evaluation.zoo.registry.load_trigger``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cbd_fast.evaluation.backdoors import Trigger

__all__ = [
    "TRIGGER_FILE_FORMAT",
    "ZooTrigger",
    "check_channels",
    "check_images",
    "check_pattern",
    "pattern_for",
    "read_trigger_file",
    "save_trigger",
]

#: the ``format`` field of a trigger state file (``save_trigger``).
TRIGGER_FILE_FORMAT = "cbd_fast.zoo.trigger/1"


def check_images(images: Any, *, where: str = "images") -> torch.Tensor:
    """``images`` if it is a float tensor [N, C, H, W]; raises otherwise.

    Raises:
        TypeError: not a tensor.
        ValueError: not 4-D or not floating point (the message names the shape and dtype).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{where} must be a float tensor [N, C, H, W]; got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"{where} must be a float tensor [N, C, H, W]; "
            f"got shape {tuple(images.shape)} dtype {images.dtype}"
        )
    return images


def check_channels(images: torch.Tensor, channels: int, *, who: str, what: str) -> None:
    """Raise ``ValueError`` unless ``images`` [N, C, H, W] has ``channels`` channels (for a trigger whose
    learned parts were built for one channel count); the message is
    ``f"{who}: {what} {channels}-channel images; got shape {shape}"``."""
    if images.shape[1] != channels:
        raise ValueError(f"{who}: {what} {channels}-channel images; got shape {tuple(images.shape)}")


def check_pattern(pattern: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``pattern`` is a non-empty [h, w] or [c, h, w] tensor in [0, 1]
    (the message names the shape or the range found)."""
    if pattern.dim() not in (2, 3) or pattern.numel() == 0:
        raise ValueError(f"pattern must be [h, w] or [c, h, w]; got shape {tuple(pattern.shape)}")
    lo, hi = float(pattern.min()), float(pattern.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"pattern values must be in [0, 1]; got [{lo}, {hi}]")


def pattern_for(pattern: torch.Tensor, images: torch.Tensor, what: str) -> torch.Tensor:
    """A [h, w] or [c, h, w] pattern as [1, C, h, w] in ``images``' dtype/device (c must be 1 or C).

    Raises:
        ValueError: the pattern's channels do not fit the images (the message names both shapes).
    """
    p = pattern if pattern.dim() == 3 else pattern.unsqueeze(0)
    c = images.shape[1]
    if p.dim() != 3 or p.shape[0] not in (1, c):
        raise ValueError(
            f"{what} pattern of shape {tuple(pattern.shape)} does not fit images of shape "
            f"{tuple(images.shape)} (channels must be 1 or {c})"
        )
    return p.to(images).expand(c, -1, -1).unsqueeze(0)


class ZooTrigger(Trigger):
    """A zoo trigger: ``apply`` does the work, ``__call__`` checks the input and clamps to [0, 1].

    Subclasses set ``name`` and implement ``apply(images) -> tensor`` (any range; the result is clamped,
    never in place on the input). Calls run without autograd: a zoo trigger is a fixed transform, not a
    differentiable layer (trainable attacks differentiate through their own generator methods).
    Stateful subclasses set ``stateful = True`` and implement ``config``, ``state_dict`` and
    ``from_state``.
    """

    name = "zoo"
    stateful = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        with torch.no_grad():
            out = self.apply(images)
        if out.shape != images.shape:  # pragma: no cover - guards subclasses
            raise RuntimeError(f"{self.name} changed the shape {tuple(images.shape)} -> {tuple(out.shape)}")
        return torch.clamp(out, 0.0, 1.0).to(images.dtype)

    def config(self) -> dict[str, Any]:
        """JSON-able scalars that rebuild this trigger together with ``state_dict()`` (stateful ones)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learned tensors (empty for a trigger that its settings fully define)."""
        return {}

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> ZooTrigger:
        """Rebuild a trigger saved by ``save_trigger`` (stateful subclasses override this)."""
        raise NotImplementedError(f"{cls.__name__} has no saved state")


def save_trigger(trigger: ZooTrigger, path: str | os.PathLike[str], *, attack: str) -> Path:
    """Write ``trigger``'s config and state to ``path`` (atomic; read back with ``load_trigger``).

    The file is a ``torch.save`` of ``{"format", "attack", "config", "state"}``: plain data and
    tensors only, so it loads with ``torch.load(weights_only=True)``.

    Args:
        trigger: a zoo trigger.
        path: the file to write.
        attack: the registered attack name (``load_trigger`` rebuilds the trigger with its class).
    """
    if not isinstance(trigger, ZooTrigger):
        raise TypeError(f"trigger must be a ZooTrigger; got {type(trigger).__name__}")
    path = Path(path)
    payload = {
        "format": TRIGGER_FILE_FORMAT,
        "attack": attack,
        "config": trigger.config(),
        "state": {k: v.detach().cpu().contiguous() for k, v in trigger.state_dict().items()},
    }
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_trigger_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``{"format", "attack", "config", "state"}`` dict of a trigger file, read without running code.

    Raises:
        ValueError: the file was refused or is not a trigger file (the message names it and says why).
    """
    from cbd_fast.core.safe_load import UnsafeFileError, torch_load_weights

    try:
        payload = torch_load_weights(path)
    except UnsafeFileError as exc:
        raise ValueError(f"cannot read trigger file {str(path)!r}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != TRIGGER_FILE_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{str(path)!r} is not a trigger file (format {TRIGGER_FILE_FORMAT!r}); got {got!r}")
    return payload
