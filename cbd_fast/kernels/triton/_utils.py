"""Helpers shared by the Triton kernel modules of this package (no Triton import here).

The module name starts with an underscore, so ``scripts/check_triton_hopper.py`` (which compiles
each public module's ``hopper_compile_specs()``) skips it.
"""

from __future__ import annotations

import os

import torch

__all__ = ["TL_DTYPE", "interpreting", "pointer_type", "dtype_name"]

#: Storage dtypes the Triton kernels take, with Triton's name of each.
TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (the kernels then run on CPU tensors in the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pointer_type(dtype: torch.dtype) -> str:
    """The signature string of a pointer to ``dtype`` elements, e.g. ``"*bf16"`` for ``torch.bfloat16``."""
    return f"*{TL_DTYPE[dtype]}"


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: a suffix for compile-spec names."""
    return str(dtype).removeprefix("torch.")
