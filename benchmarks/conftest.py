"""Shared pytest set-up for the benchmark suites (``python -m pytest benchmarks/bench_*.py``).

- ``benchmarks/`` is put on ``sys.path`` so suites can import their helpers (``models``,
  ``reference_loops``).
- Every benchmark starts from ``torch.manual_seed(0)``.
- The report header names the machine's threads and devices, so a JSON/console log says where it ran.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))


def pytest_report_header(config: pytest.Config) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"cbd_fast benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, CUDA device: {device}"
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
