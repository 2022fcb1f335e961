"""Shared pytest set-up for the cbd_fast suite.

- Without a CUDA device, ``TRITON_INTERPRET=1`` is set here, before any test module is imported,
  so the Triton kernels (defined at import of ``cbd_fast.kernels.triton.*``) run on CPU tensors
  under the interpreter. An explicit ``TRITON_INTERPRET`` in the environment is left alone. The
  automatic backend choice never picks the interpreter, so only tests that ask for
  ``backend="triton"`` use it.
- Tests marked ``gpu`` are skipped when no CUDA device is visible.
- Every test starts from ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()  # queries the driver; creates no CUDA context

if not CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"cbd_fast: torch {torch.__version__}, CUDA device: {CUDA}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}"
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on tiny ops one thread is faster than two fighting over a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
