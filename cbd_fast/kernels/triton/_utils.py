"""Helpers shared by the Triton kernel modules of this package (no Triton import here).

The module name starts with an underscore, so ``scripts/check_triton_hopper.py`` (which compiles
each public module's ``hopper_compile_specs()``) skips it.
"""

from __future__ import annotations

import contextlib
import os
from functools import cache

import torch

__all__ = [
    "TL_DTYPE",
    "INTERPRETER_SMS",
    "interpreting",
    "pointer_type",
    "dtype_name",
    "device_guard",
    "sm_count",
]

#: Storage dtypes the Triton kernels take, with Triton's name of each.
TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

#: The "multiprocessor count" the launchers assume under the interpreter: small, so that the tests'
#: small shapes are split over column tiles as small batches are on a GPU.
INTERPRETER_SMS = 4


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (the kernels then run on CPU tensors in the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pointer_type(dtype: torch.dtype) -> str:
    """The signature string of a pointer to ``dtype`` elements, e.g. ``"*bf16"`` for ``torch.bfloat16``."""
    return f"*{TL_DTYPE[dtype]}"


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: a suffix for compile-spec names."""
    return str(dtype).removeprefix("torch.")


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context every Triton launch runs in: ``torch.cuda.device(t.device)`` for CUDA tensors.

    Triton launches on the *current* CUDA device and stream; tensors on ``cuda:1`` while device 0
    is current would otherwise be handed to a kernel running on device 0. A no-op for CPU tensors
    (the interpreter).
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@cache
def _cuda_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100/H200 SXM); ``INTERPRETER_SMS`` on CPU."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
