"""Progress bars for long phases (loading, purifying, evaluating): a thin wrapper over tqdm.

One switch for the whole process: :func:`set_quiet` (the CLI's ``--quiet``) or the environment
variable ``CBD_FAST_QUIET=1`` turns every bar off. Only the main process of a distributed run draws
bars: a rank other than 0 (``torch.distributed`` when initialised, else the ``RANK`` /
``LOCAL_RANK`` environment variables torchrun sets) never does. Bars go to stderr, so stdout
stays clean for results.

Example:
    >>> from cbd_fast.core.progress import progress
    >>> for batch in progress(range(3), desc="evaluating", unit="batch"):  # doctest: +SKIP
    ...     pass
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["progress", "set_quiet", "is_quiet", "is_main_process", "enabled"]

_QUIET: bool | None = None  # None: decided by the environment


def set_quiet(quiet: bool | None) -> None:
    """Turn every progress bar of this process off (True), on (False) or back to the default (None).

    Args:
        quiet: True hides bars; False shows them (still only on the main process); None defers to
            the environment variable ``CBD_FAST_QUIET``.
    """
    global _QUIET
    if quiet is not None and not isinstance(quiet, bool):
        raise TypeError(f"quiet must be a bool or None; got {quiet!r}")
    _QUIET = quiet


def is_quiet() -> bool:
    """True when bars are switched off by :func:`set_quiet` or ``CBD_FAST_QUIET``."""
    if _QUIET is not None:
        return _QUIET
    return os.environ.get("CBD_FAST_QUIET", "0").strip().lower() not in ("", "0", "false", "no")


def is_main_process() -> bool:
    """True on rank 0 of a distributed run, and always in a single-process run."""
    dist_mod = sys.modules.get("torch.distributed")  # never import torch just to ask
    if dist_mod is not None:
        try:
            if dist_mod.is_available() and dist_mod.is_initialized():
                return dist_mod.get_rank() == 0
        except Exception:  # pragma: no cover - a half-initialised backend: fall back to the env
            pass
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value not in (None, ""):
            try:
                return int(value) == 0
            except ValueError:
                return True
    return True


def enabled() -> bool:
    """True when this process should draw progress bars (not quiet, main process)."""
    return not is_quiet() and is_main_process()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool | None = None,
    leave: bool = False,
    **kwargs: Any,
) -> Any:
    """A tqdm bar that honours ``--quiet`` and the process rank.

    Args:
        iterable: what to iterate over (None for a manually ``update``d bar).
        total: the number of items when ``len(iterable)`` is not known (or for a manual bar).
        desc: the bar's label, e.g. ``"loading images"``.
        unit: the unit name shown in the rate (``"img"``, ``"batch"``, ...).
        disable: force the bar off (True) or follow :func:`enabled` (None/False).
        leave: keep the finished bar on screen.
        **kwargs: passed to ``tqdm.tqdm`` unchanged.

    Returns:
        a ``tqdm.tqdm`` instance (iterable, usable as a context manager, with ``update``/
        ``set_postfix``). When tqdm is not installed, a no-op stand-in with the same methods.
    """
    off = bool(disable) or not enabled()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return _NullBar(iterable)
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=off, leave=leave, file=sys.stderr, **kwargs
    )


class _NullBar:
    """The subset of tqdm's interface the package uses, doing nothing."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self._iterable = iterable if iterable is not None else ()

    def __iter__(self):  # noqa: D105
        return iter(self._iterable)

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        return None

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None
