"""The adversary interface: what an adversary receives (:class:`AttackInputs`), how it declares
its settings (:class:`Option`), the base class and the registry ``ADVERSARIES``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cbd_fast.core.registry import instantiate, registrar

__all__ = ["AttackInputs", "Option", "Adversary", "ADVERSARIES", "register_adversary", "make_adversary"]


@dataclass
class AttackInputs:
    """What an adversary may use, for one batch.

    Attributes:
        encoder: the module being purified, mapping images [B, C, H, W] to features [B, D] (already
            flattened; NOT wrapped in DDP). The adversary must leave its flags and requires_grad as
            it found them (``cbd_fast.core.attack.contrastive_pgd`` does).
        x: [B, C, H, W] float clean images in [0, 1] on the device (this rank's slice).
        clean_features: [B_global, D] float32 clean anchors f_theta(x) (no gradient; gathered over
            ranks when distributed, with this rank's rows at its offset).
        indices: [B] int64 sample indices on the device, the key of the per-sample randomness.
        epoch: 0-based epoch.
        gather: None in one process; when distributed, [B, D] -> [B_global, D] all-gather that keeps
            the local rows' gradient path (for the attack's features).
        config: the run's PurifyConfig (epsilon, step_size, steps, temperature, backend, seed...).
        rank: this rank's index (0 in one process): its anchors are ``clean_features[rank*B:(rank+1)*B]``
            (every rank holds the same B), see :attr:`local_clean_features`.
        reduce: None in one process; when distributed, a sum over ranks of a tensor (a new tensor,
            the same on every rank), for decisions an adversary must take on the global batch
            (universal parameters' gradients, statistics).
        offset: where this rank's rows start in ``clean_features`` when ranks hold different numbers
            of images (``adv_fraction < 1`` under torch.distributed); None: ``rank * B``.
        head: None, or the run's known head as a function [M, D] features -> [M, K] float32 logits,
            differentiable in the features (its own parameters frozen), for adversaries that read
            the head's predictions (``trigger_search``'s ``head_attack``).
    """

    encoder: nn.Module
    x: torch.Tensor
    clean_features: torch.Tensor
    indices: torch.Tensor
    epoch: int
    gather: Callable[[torch.Tensor], torch.Tensor] | None
    config: Any  # the run's PurifyConfig
    rank: int = 0
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    offset: int | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def local_clean_features(self) -> torch.Tensor:
        """[B, D] the anchors of this rank's own images (all of ``clean_features`` in one process)."""
        b = self.x.shape[0]
        lo = self.rank * b if self.offset is None else self.offset
        return self.clean_features[lo : lo + b]

    def part(self, lo: int, hi: int, *, global_negatives: bool) -> AttackInputs:
        """The inputs restricted to this rank's rows ``lo:hi`` (a sub-attack on part of the batch).

        Args:
            lo, hi: 0 <= lo <= hi <= B, the same on every rank.
            global_negatives: keep ``gather`` and, as anchors, rows ``lo:hi`` of EVERY rank's slice
                (rank-major, matching what ``gather`` returns for the part's features): the part's
                loss then uses all ranks' parts as negatives. False: local anchors, ``gather=None``
                (for sub-attacks whose state is rank-local). Identical in one process.
        """
        b = self.x.shape[0]
        if global_negatives and self.gather is not None and self.offset is not None:
            raise ValueError(
                "this adversary splits the batch into parts with global negatives, which needs the same "
                "number of images on every rank; with adv_fraction < 1 under torch.distributed use "
                "adversary='trigger_search' or 'pgd', or adv_fraction=1.0"
            )
        if global_negatives and self.gather is not None:
            world = self.clean_features.shape[0] // b
            anchors = self.clean_features.view(world, b, -1)[:, lo:hi].reshape(world * (hi - lo), -1)
            gather = self.gather
        else:
            anchors, gather = self.local_clean_features[lo:hi], None
        return AttackInputs(
            encoder=self.encoder,
            x=self.x[lo:hi],
            clean_features=anchors,
            indices=self.indices[lo:hi],
            epoch=self.epoch,
            gather=gather,
            config=self.config,
            rank=self.rank if gather is not None else 0,
            reduce=self.reduce if gather is not None else None,
            head=self.head,
        )


@dataclass(frozen=True)
class Option:
    """One setting of an adversary (a key of ``PurifyConfig.adversary_options``).

    Attributes:
        default: the value when the user gives none (None: derived at run time, see ``doc``).
        kind: ``int`` or ``float`` (ints are accepted for floats).
        minimum: inclusive lower bound.
        maximum: inclusive upper bound (None: unbounded).
        doc: one line for the docs and the error messages.
    """

    default: Any
    kind: type
    minimum: float
    maximum: float | None = None
    doc: str = ""

    def check(self, adversary: str, key: str, value: Any) -> Any:
        """``value`` as ``kind``; TypeError/ValueError naming the adversary, the key and the value."""
        where = f"adversary_options[{key!r}] of adversary {adversary!r}"
        if value is None and self.default is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind is int and isinstance(value, float):
            ok = ok and value.is_integer()
        if not ok:
            raise TypeError(
                f"{where} must be {'an integer' if self.kind is int else 'a real number'}; got {value!r}"
            )
        value = self.kind(value)
        if value != value or value < self.minimum or (self.maximum is not None and value > self.maximum):
            hi = "" if self.maximum is None else f" and <= {self.maximum:g}"
            raise ValueError(f"{where} must be >= {self.minimum:g}{hi} ({self.doc}); got {value}")
        return value


class Adversary:
    """Base class: ``__call__(inputs) -> x_adv`` (detached, same shape/dtype/device as ``inputs.x``).

    Settings: a subclass declares its settings in ``OPTIONS`` (name -> :class:`Option`); the user sets
    them with ``PurifyConfig(adversary_options={...})`` and the instance reads them, defaults filled
    in, from ``self.options``.
    """

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, config: Any) -> None:
        """``config``: the run's validated PurifyConfig (its ``adversary_options`` are read here)."""
        self.config = config
        self.options = self.check_options(getattr(config, "adversary_options", None))

    @classmethod
    def check_options(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """``OPTIONS``' defaults updated with ``options`` (a new dict; ``options`` is not modified).

        Raises:
            TypeError: ``options`` is not a dict or None, or a value has the wrong type.
            ValueError: a key the adversary does not have (the valid ones are listed) or a value out of
                range.
        """
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise TypeError(f"adversary_options must be a dict or None; got {type(options).__name__}")
        unknown = sorted(str(k) for k in options if k not in cls.OPTIONS)
        if unknown:
            valid = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise ValueError(
                f"adversary_options {', '.join(map(repr, unknown))} not settings of adversary {cls.name!r}; "
                f"its settings: {valid}"
            )
        out = {k: opt.default for k, opt in cls.OPTIONS.items()}
        for k, v in options.items():
            out[k] = cls.OPTIONS[k].check(cls.name, k, v)
        cls.check_combination(out)
        return out

    @classmethod
    def check_combination(cls, options: dict[str, Any]) -> None:
        """Constraints between settings (ValueError naming them); none by default."""

    def __call__(self, inp: AttackInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State kept across batches (e.g. a scanned patch, a persistent flow field) as plain data:
        tensors (CPU), numbers, strings, None, lists, dicts, what ``torch.load(weights_only=True)``
        reads. The loop saves it in every checkpoint so a resumed run continues exactly. Default:
        ``{}`` (a stateless adversary)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors may arrive on the CPU).

        Args:
            state: a dict from :meth:`state_dict` of the same adversary class.
        """
        if state:
            raise ValueError(f"adversary {self.name!r} keeps no state; got state keys {sorted(state)}")


#: name -> Adversary subclass. ``PurifyConfig.adversary`` must be one of these keys.
ADVERSARIES: dict[str, type[Adversary]] = {}


#: Class decorator: ``@register_adversary(name)`` adds an Adversary subclass to ADVERSARIES.
register_adversary: Callable[[str], Callable[[type[Adversary]], type[Adversary]]] = registrar(
    ADVERSARIES, Adversary, "an adversary"
)


def make_adversary(config: Any) -> Adversary:
    """Instantiate the adversary ``config.adversary`` names (ValueError listing registered names)."""
    return instantiate(ADVERSARIES, "adversary", config)  # type: ignore[return-value]
