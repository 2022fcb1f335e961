"""A name -> class registry with a validating class decorator (adversaries, clean terms)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)


def registrar(registry: dict[str, T], base: type, what: str) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory ``register(name)`` adding subclasses of ``base`` to ``registry``.

    Args:
        registry: the dict to fill (name -> class); the class also gets ``cls.name = name``.
        base: the class every registered class must subclass.
        what: how messages call an entry, e.g. "an adversary".
    """

    def register(name: str) -> Callable[[T], T]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")

        def deco(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"{what} must subclass {base.__name__}; got {cls!r}")
            cls.name = name
            registry[name] = cls
            return cls

        return deco

    return register


def instantiate(registry: dict[str, T], field: str, config: object) -> object:
    """``registry[config.<field>](config)``; a name not registered -> ValueError listing the valid ones."""
    name = getattr(config, field)
    cls = registry.get(name)
    if cls is None:
        raise ValueError(f"{field} must be one of {sorted(registry)}; got {name!r}")
    return cls(config)
