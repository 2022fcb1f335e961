"""Optional packages and programs of the test suite: skipped with a reason where they are missing,
a failure where the environment says they are required (CI sets the variables, so a test that
would silently skip there fails instead).

- ``CBD_FAST_REQUIRE_BACKBONES=1``: timm, torchvision and transformers must import (the backbone
  tests; ``scripts/test_backbones.sh`` sets it in the torch 2.14.1 venv where torchvision imports);
- ``CBD_FAST_REQUIRE_CHROMIUM=1``: a headless Chromium must be on PATH (the HTML report render test).
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

BACKBONES_ENV = "CBD_FAST_REQUIRE_BACKBONES"
CHROMIUM_ENV = "CBD_FAST_REQUIRE_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _required(env: str) -> bool:
    return os.environ.get(env, "0").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str, env: str) -> None:
    """Skip with ``reason``, or fail when ``env`` requires what is missing."""
    if _required(env):
        pytest.fail(f"{reason}, but {env}=1 requires it", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, env: str = BACKBONES_ENV) -> ModuleType:
    """``import name``, or skip (fail when ``env`` is set) naming why it does not import."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install (torchvision against another torch)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        missing(
            f"{name} does not import here ({type(exc).__name__}: {first}); the backbone tests run in "
            "the torch 2.14.1 venv of scripts/test_backbones.sh",
            env,
        )
        raise  # pragma: no cover - missing() always raises


def chromium() -> str:
    """The path of a headless-capable Chromium, or skip (fail under CBD_FAST_REQUIRE_CHROMIUM=1)."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    missing("no chromium on PATH (apt-get install chromium)", CHROMIUM_ENV)
    raise AssertionError("unreachable")  # pragma: no cover
