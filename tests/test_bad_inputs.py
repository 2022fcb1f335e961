"""The bad-input catalogue: every row is one bad input to the ops, ``purify``, the config or
the CLI, the exception TYPE it must raise (or the CLI's exit status) and the message fragments that
name the argument AND the offending value. None may crash, hang, segfault or return a wrong result.

Tables (one row per case; read them as documentation, the README's Troubleshooting section quotes them):

- ``OP_CASES``      ``nt_xent`` / ``NTXentLoss`` / ``pgd_step`` / ``pgd_init`` / ``contrastive_pgd``, run
                    on every backend available on the CPU here (cpp, torch, and triton under
                    ``TRITON_INTERPRET=1``; validation runs before any kernel, so triton rows are cheap).
- ``API_CASES``     ``purify`` / ``Purifier`` / ``PurifyConfig`` / checkpoints.
- ``CLI_CASES``     ``cbd_fast.app.cli.main``: exit status 1 (error) or 2 (usage), one stderr line with the
                    fragments, and no output file written.

The "meta" device stands in for a second device when there is no GPU.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import cbd_fast
from cbd_fast.app import cli
from cbd_fast.core import checkpoint as ckpt
from cbd_fast.core.attack import contrastive_pgd
from cbd_fast.core.config import PurifyConfig
from cbd_fast.evaluation import diagnostics
from cbd_fast.ops import nt_xent, pgd_init, pgd_step
from cbd_fast.ops.backends import backend_status
from cbd_fast.ops.losses import NTXentLoss

BACKENDS = [name for name in ("cpp", "torch", "triton") if backend_status("cpu")[name] is None]


@dataclass(frozen=True)
class Case:
    """One bad input: ``call(arg)`` must raise ``exc`` with every fragment in its message.

    For op rows ``arg`` is the backend name; for API rows the module fixture ``Env``.
    ``backends``: restrict an op row to these backends (None: all).
    """

    name: str
    call: Callable[[Any], object]
    exc: type[BaseException]
    fragments: tuple[str, ...]
    backends: tuple[str, ...] | None = None


# ---- tensors used by the op rows ------------------------------------------------------------------------


def _f(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return (
        torch.rand(*shape, dtype=dtype, device=device)
        if device != "meta"
        else torch.empty(*shape, device=device)
    )


def _pgd(**kw: Any) -> Callable[[str], object]:
    """pgd_step on [2, 3, 4, 4] float32 tensors with some of them (or the scalars) replaced by ``kw``."""

    def call(backend: str) -> object:
        args = {"x_adv": _f(2, 3, 4, 4), "grad": torch.randn(2, 3, 4, 4), "x_clean": _f(2, 3, 4, 4)}
        args.update({k: v for k, v in kw.items() if k in args})
        scal = {"step_size": 2 / 255, "epsilon": 8 / 255, "lower": 0.0, "upper": 1.0}
        scal.update({k: v for k, v in kw.items() if k in scal})
        return pgd_step(
            args["x_adv"],
            args["grad"],
            args["x_clean"],
            scal["step_size"],
            scal["epsilon"],
            lower=scal["lower"],
            upper=scal["upper"],
            backend=backend,
        )

    return call


def _overlapping_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """x_adv and grad that share memory, offset by one element (a partial overlap)."""
    buf = torch.randn(2 * 3 * 4 * 4 + 1)
    return buf[:-1].view(2, 3, 4, 4), buf[1:].view(2, 3, 4, 4)


_OV_X, _OV_G = _overlapping_pair()


class _Enc(nn.Module):
    """A tiny encoder [B, 1, 6, 6] -> [B, 16]; ``out`` picks a bad output form."""

    def __init__(self, out: str = "tensor", width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, stride=2)
        self.out = out

    def forward(self, x: torch.Tensor) -> Any:
        z = self.conv(x).flatten(1)
        if self.out == "nan":
            return z * float("nan")
        if self.out == "inf":
            return z + float("inf")
        if self.out == "tuple":
            return z, z
        if self.out == "dict":
            return {"features": z}
        if self.out == "int":
            return (z * 100).long()
        if self.out == "scalar":
            return z.sum()
        return z


def _attack(encoder: nn.Module | None = None, **kw: Any) -> Callable[[str], object]:
    def call(backend: str) -> object:
        enc = encoder if encoder is not None else _Enc()
        x = kw.pop("x", None) if "x" in kw else _f(4, 1, 6, 6)
        clean = kw.pop("clean_features", None) if "clean_features" in kw else torch.randn(4, 16)
        args = {"epsilon": 8 / 255, "step_size": 2 / 255, "steps": 1, "temperature": 0.5}
        args.update(kw)
        return contrastive_pgd(enc, x, clean, backend=backend, **args)

    return call


OP_CASES = [
    # -- nt_xent: ranks and shapes
    Case(
        "nt_xent 1-D a",
        lambda bk: nt_xent(_f(8), _f(8), backend=bk),
        ValueError,
        ("a must be 2-D", "1-D", "(8,)"),
    ),
    Case(
        "nt_xent 3-D b",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8, 1), backend=bk),
        ValueError,
        ("b must be 2-D", "(4, 8, 1)"),
    ),
    Case(
        "nt_xent shapes differ",
        lambda bk: nt_xent(_f(4, 8), _f(4, 9), backend=bk),
        ValueError,
        ("b must have a's shape", "(4, 9)"),
    ),
    Case(
        "nt_xent one row (no negative)",
        lambda bk: nt_xent(_f(1, 8), _f(1, 8), backend=bk),
        ValueError,
        ("N >= 2", "N=1"),
    ),
    Case(
        "nt_xent zero features",
        lambda bk: nt_xent(_f(4, 0), _f(4, 0), backend=bk),
        ValueError,
        ("D >= 1", "D=0"),
    ),
    Case(
        "nt_xent empty batch",
        lambda bk: nt_xent(_f(0, 8), _f(0, 8), backend=bk),
        ValueError,
        ("N >= 2", "N=0"),
    ),
    # -- nt_xent: dtypes and devices
    Case(
        "nt_xent dtypes differ",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8, dtype=torch.float64), backend=bk),
        TypeError,
        ("b must have a's dtype", "torch.float64"),
    ),
    Case(
        "nt_xent integer tensor",
        lambda bk: nt_xent(torch.ones(4, 8, dtype=torch.int64), _f(4, 8), backend=bk),
        TypeError,
        ("a must be", "torch.int64"),
    ),
    Case(
        "nt_xent complex tensor",
        lambda bk: nt_xent(_f(4, 8), torch.ones(4, 8, dtype=torch.complex64), backend=bk),
        TypeError,
        ("b must be", "torch.complex64"),
    ),
    Case(
        "nt_xent bool tensor",
        lambda bk: nt_xent(torch.ones(4, 8, dtype=torch.bool), _f(4, 8), backend=bk),
        TypeError,
        ("a must be", "torch.bool"),
    ),
    Case(
        "nt_xent devices differ (meta)",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8, device="meta"), backend=bk),
        ValueError,
        ("same device", "cpu", "meta"),
    ),
    Case(
        "nt_xent not a tensor",
        lambda bk: nt_xent([[0.0] * 8] * 4, _f(4, 8), backend=bk),
        TypeError,
        ("a must be a torch.Tensor", "list"),
    ),
    Case(
        "nt_xent float64 on triton",
        lambda bk: nt_xent(_f(4, 8, dtype=torch.float64), _f(4, 8, dtype=torch.float64), backend=bk),
        TypeError,
        ("backend 'triton'", "torch.float64"),
        ("triton",),
    ),
    # -- nt_xent: hyper-parameters
    Case(
        "nt_xent temperature 0",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8), 0.0, backend=bk),
        ValueError,
        ("temperature must be finite and > 0", "0.0"),
    ),
    Case(
        "nt_xent temperature negative",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8), -0.5, backend=bk),
        ValueError,
        ("temperature", "-0.5"),
    ),
    Case(
        "nt_xent temperature NaN",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8), float("nan"), backend=bk),
        ValueError,
        ("temperature", "nan"),
    ),
    Case(
        "nt_xent temperature inf",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8), float("inf"), backend=bk),
        ValueError,
        ("temperature", "inf"),
    ),
    Case(
        "nt_xent temperature string",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8), "0.5", backend=bk),
        TypeError,
        ("temperature must be a real number", "'0.5'"),
    ),
    Case(
        "nt_xent temperature tensor",
        lambda bk: nt_xent(_f(4, 8), _f(4, 8), torch.tensor([0.5, 0.5]), backend=bk),
        TypeError,
        ("temperature", "Tensor"),
    ),
    Case(
        "NTXentLoss temperature 0",
        lambda bk: NTXentLoss(temperature=0, backend=bk),
        ValueError,
        ("temperature", "0"),
    ),
    # -- pgd_step (in place): shapes, dtypes, devices, layouts
    Case(
        "pgd_step grad shape",
        _pgd(grad=torch.randn(2, 3, 4, 5)),
        ValueError,
        ("grad must have x_adv's shape", "(2, 3, 4, 5)"),
    ),
    Case(
        "pgd_step x_clean dtype",
        _pgd(x_clean=_f(2, 3, 4, 4, dtype=torch.float16)),
        TypeError,
        ("x_clean must have x_adv's dtype", "torch.float16"),
    ),
    Case(
        "pgd_step x_clean on meta",
        _pgd(x_clean=_f(2, 3, 4, 4, device="meta")),
        ValueError,
        ("x_clean must be on x_adv's device", "meta"),
    ),
    Case(
        "pgd_step integer x_adv",
        _pgd(x_adv=torch.zeros(2, 3, 4, 4, dtype=torch.int32)),
        TypeError,
        ("x_adv must be", "torch.int32"),
    ),
    Case(
        "pgd_step uint8 images",
        _pgd(x_adv=torch.zeros(2, 3, 4, 4, dtype=torch.uint8)),
        TypeError,
        ("x_adv must be", "torch.uint8"),
    ),
    Case(
        "pgd_step complex grad",
        _pgd(grad=torch.zeros(2, 3, 4, 4, dtype=torch.complex64)),
        TypeError,
        ("grad must be", "torch.complex64"),
    ),
    Case(
        "pgd_step non-contiguous x_adv",
        _pgd(
            x_adv=_f(2, 3, 4, 8)[..., ::2],
            grad=torch.randn(2, 3, 4, 8)[..., ::2],
            x_clean=_f(2, 3, 4, 8)[..., ::2],
        ),
        ValueError,
        ("x_adv must be dense", "strides (96, 32, 8, 2)"),
    ),
    Case(
        "pgd_step expanded (overlapping) x_adv",
        _pgd(x_adv=_f(1, 3, 4, 4).expand(2, 3, 4, 4)),
        ValueError,
        ("x_adv must be dense and non-overlapping", "(0, 16, 4, 1)"),
    ),
    Case(
        "pgd_step x_adv overlaps grad",
        _pgd(x_adv=_OV_X, grad=_OV_G),
        ValueError,
        ("x_adv partially overlaps grad",),
    ),
    Case(
        "pgd_step layouts differ",
        _pgd(grad=torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)),
        ValueError,
        ("grad must have x_adv's memory layout", "(48, 1, 12, 3)"),
    ),
    Case(
        "pgd_step not a tensor",
        _pgd(grad=np.zeros((2, 3, 4, 4), np.float32)),
        TypeError,
        ("grad must be a torch.Tensor", "ndarray"),
    ),
    # -- pgd_step: scalars
    Case("pgd_step negative epsilon", _pgd(epsilon=-0.1), ValueError, ("epsilon must be >= 0", "-0.1")),
    Case(
        "pgd_step NaN step_size",
        _pgd(step_size=float("nan")),
        ValueError,
        ("step_size must be finite", "nan"),
    ),
    Case("pgd_step negative step_size", _pgd(step_size=-1.0), ValueError, ("step_size must be >= 0", "-1.0")),
    Case("pgd_step bool epsilon", _pgd(epsilon=True), TypeError, ("epsilon must be a real number", "True")),
    Case(
        "pgd_step lower > upper",
        _pgd(lower=1.0, upper=0.0),
        ValueError,
        ("lower must be <= upper", "lower=1.0", "upper=0.0"),
    ),
    Case("pgd_step infinite upper", _pgd(upper=float("inf")), ValueError, ("upper must be finite", "inf")),
    # -- pgd_init
    Case(
        "pgd_init negative epsilon",
        lambda bk: pgd_init(_f(2, 3), -1.0),
        ValueError,
        ("epsilon must be >= 0", "-1.0"),
    ),
    Case(
        "pgd_init integer images",
        lambda bk: pgd_init(torch.zeros(2, 3, dtype=torch.uint8), 0.1),
        TypeError,
        ("x_clean must be", "torch.uint8"),
    ),
    Case(
        "pgd_init generator of wrong type",
        lambda bk: pgd_init(_f(2, 3), 0.1, generator=0),
        TypeError,
        ("generator must be a torch.Generator", "int"),
    ),
    # -- contrastive_pgd
    Case(
        "attack: encoder is a function",
        lambda bk: _attack(encoder=lambda x: x)(bk),
        TypeError,
        ("encoder must be a torch.nn.Module", "function"),
    ),
    Case(
        "attack: encoder returns a tuple",
        lambda bk: _attack(encoder=_Enc("tuple"))(bk),
        TypeError,
        ("the encoder returned tuple",),
    ),
    Case(
        "attack: encoder returns a dict",
        lambda bk: _attack(encoder=_Enc("dict"))(bk),
        TypeError,
        ("the encoder returned dict",),
    ),
    Case(
        "attack: integer images",
        lambda bk: _attack(x=torch.zeros(4, 1, 6, 6, dtype=torch.uint8))(bk),
        TypeError,
        ("x must be a float tensor", "torch.uint8"),
    ),
    Case(
        "attack: anchors batch differs",
        lambda bk: _attack(clean_features=torch.randn(3, 16))(bk),
        ValueError,
        ("clean_features must have x's batch size 4", "(3, 16)"),
    ),
    Case(
        "attack: anchors on meta",
        lambda bk: _attack(clean_features=torch.empty(4, 16, device="meta"))(bk),
        ValueError,
        ("clean_features must be on x's device", "meta"),
    ),
    Case(
        "attack: negative steps",
        lambda bk: _attack(steps=-1)(bk),
        ValueError,
        ("steps must be an int >= 0", "-1"),
    ),
    Case("attack: float steps", lambda bk: _attack(steps=2.5)(bk), ValueError, ("steps", "2.5")),
    Case(
        "attack: temperature 0",
        lambda bk: _attack(temperature=0.0)(bk),
        ValueError,
        ("temperature must be > 0", "0.0"),
    ),
    Case(
        "attack: x_init shape",
        lambda bk: _attack(x_init=_f(4, 1, 6, 5))(bk),
        ValueError,
        ("x_init must match x", "(4, 1, 6, 5)"),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.name)
def test_op_bad_input(case: Case, backend: str) -> None:
    if case.backends is not None and backend not in case.backends:
        pytest.skip(f"{case.name!r} only applies to {case.backends}")
    _assert_raises(case, backend)


def _assert_raises(case: Case, arg: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "skipping unusable checkpoint" before the error
        with pytest.raises(case.exc) as info:
            case.call(arg)
    message = str(info.value)
    missing = [f for f in case.fragments if f not in message]
    assert not missing, f"{case.name}: message {message!r} lacks {missing}"


# ---- purify / Purifier / PurifyConfig / checkpoints ------------------------------------------------------

FAST = {"epochs": 1, "batch_size": 4, "steps": 1, "progress": False, "clean_term": "none"}


@dataclass
class Env:
    """Files the API rows need: a good checkpoint of ``_Enc()`` and damaged or foreign copies of it."""

    tmp: Path
    other_model: Path  # a checkpoint directory written for another architecture
    corrupt: Path  # a checkpoint directory whose only file has a flipped byte
    truncated: Path  # ... whose only file is cut in half
    garbage: Path  # a file that is not a checkpoint at all


def _images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(n))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    good = tmp / "good"
    torch.manual_seed(0)
    cbd_fast.purify(_Enc(width=6), _images(), checkpoint_dir=str(good), **FAST)
    [(_, written)] = ckpt.list_checkpoints(good)
    data = written.read_bytes()
    dirs = {}
    for name, content in (
        ("other_model", data),
        ("corrupt", data[:-40] + bytes([data[-40] ^ 0xFF]) + data[-39:]),
        ("truncated", data[: len(data) // 2]),
    ):
        d = tmp / name
        d.mkdir()
        (d / written.name).write_bytes(content)
        dirs[name] = d
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 this is a zip file, not a checkpoint")
    return Env(tmp=tmp, garbage=garbage, **dirs)


def _purify(data: Any = None, encoder: nn.Module | None = None, **kw: Any) -> Callable[[Env], object]:
    def call(e: Env) -> object:
        args = {**FAST, **{k: (v(e) if callable(v) else v) for k, v in kw.items()}}
        return cbd_fast.purify(
            encoder if encoder is not None else _Enc(), _images() if data is None else data, **args
        )

    return call


class _ListData(torch.utils.data.Dataset):
    """A map-style dataset over a list of items (images, tuples, dicts, ...)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _nan_at(n: int, i: int) -> torch.Tensor:
    x = _images(n)
    x[i, 0, 0, 0] = float("nan")
    return x


API_CASES = [
    # -- data
    Case(
        "purify: empty data",
        _purify(torch.empty(0, 1, 6, 6)),
        ValueError,
        ("data must be non-empty", "(0, 1, 6, 6)"),
    ),
    Case("purify: a single image", _purify(_images(1)), ValueError, ("at least 2 images", "got 1")),
    Case(
        "purify: NaN image",
        _purify(_nan_at(8, 3)),
        ValueError,
        ("data contain NaN/Inf value(s)", "1 in images 0..7"),
    ),
    Case(
        "purify: Inf image",
        _purify(torch.where(_images() > 0.5, float("inf"), 0.0)),
        ValueError,
        ("data contain", "NaN/Inf"),
    ),
    Case(
        "purify: values outside [0, 1]",
        _purify(_images() * 255),
        ValueError,
        ("data must be in [0, 1]", "max 2"),
    ),
    Case(
        "purify: 3-D images",
        _purify(torch.rand(8, 6, 6)),
        ValueError,
        ("data must be 4-D [N, C, H, W]", "(8, 6, 6)"),
    ),
    Case(
        "purify: int32 images",
        _purify(torch.zeros(8, 1, 6, 6, dtype=torch.int32)),
        TypeError,
        ("data must be float in [0, 1] or uint8", "torch.int32"),
    ),
    Case(
        "purify: complex images",
        _purify(torch.zeros(8, 1, 6, 6, dtype=torch.complex64)),
        TypeError,
        ("data must be float", "torch.complex64"),
    ),
    Case("purify: data is a string", _purify("images/"), TypeError, ("data must be a Tensor", "str")),
    Case(
        "purify: dataset of strings",
        _purify(_ListData(["a.png"] * 8)),
        TypeError,
        ("dataset item 0 must be an image tensor", "str"),
    ),
    Case(
        "purify: dataset dict without 'image'",
        _purify(_ListData([{"img": _images(1)[0]}] * 8)),
        ValueError,
        ("without an 'image' key", "['img']"),
    ),
    Case(
        "purify: dataset with a NaN in batch 1",
        _purify(_ListData(list(_nan_at(8, 6))), batch_size=4),
        ValueError,
        ("data batch", "of epoch 1", "NaN/Inf"),
    ),
    # -- encoders
    Case(
        "purify: encoder returns NaN",
        _purify(encoder=_Enc("nan")),
        ValueError,
        ("non-finite features (NaN/Inf)",),
    ),
    Case("purify: encoder returns Inf", _purify(encoder=_Enc("inf")), ValueError, ("non-finite features",)),
    Case(
        "purify: encoder returns a tuple",
        _purify(encoder=_Enc("tuple")),
        TypeError,
        ("must return a Tensor of features", "got a tuple", "feature_fn"),
    ),
    Case(
        "purify: encoder returns a dict",
        _purify(encoder=_Enc("dict")),
        TypeError,
        ("must return a Tensor of features", "got a dict"),
    ),
    Case(
        "purify: encoder returns integers",
        _purify(encoder=_Enc("int")),
        TypeError,
        ("features must be floating point", "torch.int64"),
    ),
    Case(
        "purify: encoder returns a scalar",
        _purify(encoder=_Enc("scalar")),
        ValueError,
        ("batch size 4 first", "()"),
    ),
    Case(
        "purify: encoder is not a module",
        _purify(encoder=torch.nn.functional.relu),
        TypeError,
        ("encoder must be a torch.nn.Module", "function"),
    ),
    Case(
        "purify: encoder without parameters",
        _purify(encoder=nn.Flatten()),
        ValueError,
        ("no floating-point parameters",),
    ),
    # -- config
    Case(
        "config: unknown key",
        _purify(epohcs=3),
        TypeError,
        ("unknown PurifyConfig field(s) 'epohcs'", "valid fields: epsilon"),
    ),
    Case(
        "config: unknown dict key",
        lambda e: cbd_fast.Purifier({"learning_rate": 0.1}),
        TypeError,
        ("'learning_rate'", "valid fields"),
    ),
    Case(
        "config: negative epsilon",
        lambda e: PurifyConfig(epsilon=-0.1).validate(),
        ValueError,
        ("epsilon must be >= 0", "-0.1"),
    ),
    Case("config: batch_size 1", _purify(batch_size=1), ValueError, ("batch_size must be >= 2", "got 1")),
    Case("config: epochs 0", _purify(epochs=0), ValueError, ("epochs must be >= 1", "got 0")),
    Case("config: temperature 0", _purify(temperature=0), ValueError, ("temperature must be > 0", "got 0")),
    Case("config: lr NaN", _purify(lr=float("nan")), ValueError, ("lr must be finite", "nan")),
    Case("config: momentum 1", _purify(momentum=1.0), ValueError, ("momentum must be in [0, 1)", "1.0")),
    Case(
        "config: input_mean without input_std",
        _purify(input_mean=(0.5,)),
        ValueError,
        ("input_mean and input_std go together", "input_std=None"),
    ),
    Case(
        "config: input_std 0",
        _purify(input_mean=(0.5,), input_std=(0.0,)),
        ValueError,
        ("input_std must be > 0", "(0.0,)"),
    ),
    Case(
        "purify: input_mean of 3 channels on 1-channel images",
        _purify(input_mean=(0.5,) * 3, input_std=(0.2,) * 3),
        ValueError,
        ("3 value(s) per channel", "with C = 1"),
    ),
    Case(
        "purify: head of the wrong kind",
        _purify(head=3),
        TypeError,
        ("head must be None", "got int 3"),
    ),
    Case(
        "purify: head that is not a submodule",
        _purify(head="fc"),
        ValueError,
        ("head 'fc' is not a submodule", "_Enc"),
    ),
    Case(
        "config: health_max_head_change 0",
        _purify(health_max_head_change=0.0),
        ValueError,
        ("health_max_head_change", "0.0"),
    ),
    Case(
        "purify: standardised images",
        _purify((_images() - 0.5) / 0.2),
        ValueError,
        ("data must be in [0, 1]", "input_mean"),
    ),
    Case("config: steps 2.5", _purify(steps=2.5), TypeError, ("steps must be an integer", "2.5")),
    Case("config: epochs as string", _purify(epochs="3"), TypeError, ("epochs must be an integer", "'3'")),
    Case(
        "config: unknown optimizer",
        _purify(optimizer="rmsprop"),
        ValueError,
        ("optimizer must be one of", "'rmsprop'"),
    ),
    Case(
        "config: unknown backend",
        _purify(backend="cudnn"),
        ValueError,
        ("backend must be None or one of", "'cudnn'"),
    ),
    Case(
        "config: unknown clean term",
        _purify(clean_term="l2"),
        ValueError,
        ("clean_term must be one of", "'l2'"),
    ),
    Case("config: bad device string", _purify(device="gpu0"), ValueError, ("device must be", "'gpu0'")),
    Case(
        "config: resume without a directory",
        _purify(resume=True),
        ValueError,
        ("resume=True needs checkpoint_dir", "None"),
    ),
    Case(
        "config: wrong config object",
        lambda e: cbd_fast.Purifier(config=[("epochs", 1)]),
        TypeError,
        ("config must be a PurifyConfig", "list"),
    ),
    # -- checkpoints
    Case(
        "resume: checkpoint of another model",
        _purify(checkpoint_dir=lambda e: str(e.other_model), resume=True),
        ckpt.CheckpointError,
        ("was written for another model", "purify-epoch0001.ckpt", "fingerprint"),
    ),
    Case(
        "resume: corrupted checkpoint",
        _purify(checkpoint_dir=lambda e: str(e.corrupt), resume=True),
        ckpt.CheckpointError,
        ("no usable checkpoint in", "corrupt", "checksum mismatch", "purify-epoch0001.ckpt"),
    ),
    Case(
        "resume: truncated checkpoint",
        _purify(checkpoint_dir=lambda e: str(e.truncated), resume=True),
        ckpt.CheckpointError,
        ("corrupt or truncated", "purify-epoch0001.ckpt"),
    ),
    # -- evaluation helpers
    Case(
        "diagnostics: a single image",
        lambda e: diagnostics.contrastive_adversaries(_Enc(), _images(1), steps=1),
        ValueError,
        ("images and batch_size must be >= 2", "got 1, 256"),
    ),
    Case(
        "load_checkpoint: not a checkpoint",
        lambda e: ckpt.load_checkpoint(e.garbage),
        ckpt.CheckpointError,
        ("is not a cbd_fast checkpoint", "garbage.ckpt"),
    ),
    Case(
        "save_checkpoint: keep 0",
        lambda e: ckpt.save_checkpoint(e.tmp / "k", 1, {}, keep=0),
        ValueError,
        ("keep must be >= 1", "got 0"),
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.name)
def test_api_bad_input(case: Case, env: Env) -> None:
    _assert_raises(case, env)


def test_resume_from_another_model_leaves_its_checkpoint_intact(env: Env) -> None:
    """Refusing a foreign checkpoint must not delete or rewrite it."""
    [(_, path)] = ckpt.list_checkpoints(env.other_model)
    before = path.read_bytes()
    with pytest.raises(ckpt.CheckpointError):
        _purify(checkpoint_dir=str(env.other_model), resume=True)(env)
    assert path.read_bytes() == before and [p for _, p in ckpt.list_checkpoints(env.other_model)] == [path]


# ---- the CLI ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliCase:
    """``cbd-fast purify <base> <argv>`` must exit with ``code`` and say ``fragments`` on stderr."""

    name: str
    argv: Callable[[dict[str, Path]], list[str]]
    code: int
    fragments: tuple[str, ...]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_cli")
    torch.manual_seed(0)
    with warnings.catch_warnings():  # a TorchScript archive: whole pickled modules need --trust-pickle
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.script(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Flatten()))
        torch.jit.save(model, str(d / "model.ts"))
    g = torch.Generator().manual_seed(0)
    np.save(d / "x.npy", torch.rand(16, 1, 6, 6, generator=g).numpy())
    nan = torch.rand(16, 1, 6, 6, generator=g)
    nan[3, 0, 1, 1] = float("nan")
    np.save(d / "nan.npy", nan.numpy())
    np.save(d / "big.npy", (torch.rand(16, 1, 6, 6, generator=g) * 3).numpy())
    np.save(d / "complex.npy", np.zeros((16, 1, 6, 6), np.complex64))
    np.save(d / "one.npy", torch.rand(1, 1, 6, 6, generator=g).numpy())
    (d / "broken.yaml").write_text("epochs: [1, 2\nsteps: 1\n")
    (d / "list.yaml").write_text("- epochs\n- 1\n")
    (d / "cfg.ini").write_text("[purify]\nepochs=1\n")
    (d / "nan_cfg.json").write_text(json.dumps({"epsilon": float("nan")}))  # JSON's NaN literal
    return {"dir": d, "model": d / "model.ts", "x": d / "x.npy", **{p.stem: p for p in d.iterdir()}}


def _cli(*extra: Any, data: str = "x") -> Callable[[dict[str, Path]], list[str]]:
    def argv(f: dict[str, Path]) -> list[str]:
        out = [
            "purify",
            "--model",
            str(f["model"]),
            "--data",
            str(f[data]),
            "--out",
            str(f["dir"] / "out.pt"),
            "--set",
            "epochs=1",
            "--set",
            "steps=1",
            "--set",
            "batch_size=4",
        ]
        return out + [str(a(f) if callable(a) else a) for a in extra]

    return argv


CLI_CASES = [
    CliCase(
        "cli: --set epochs=0",
        _cli("--set", "epochs=0"),
        1,
        ("invalid config", "epochs must be >= 1", "got 0"),
    ),
    CliCase(
        "cli: --set batch_size=1", _cli("--set", "batch_size=1"), 1, ("batch_size must be >= 2", "got 1")
    ),
    CliCase(
        "cli: --set temperature=0", _cli("--set", "temperature=0"), 1, ("temperature must be > 0", "got 0")
    ),
    CliCase(
        "cli: --set optimizer=rmsprop",
        _cli("--set", "optimizer=rmsprop"),
        1,
        ("optimizer must be one of", "'rmsprop'"),
    ),
    CliCase("cli: --set without '='", _cli("--set", "epochs"), 2, ("--set expects key=value", "'epochs'")),
    CliCase("cli: --set 8/0", _cli("--set", "epsilon=8/0"), 2, ("division by zero", "'8/0'")),
    CliCase(
        "cli: NaN epsilon from a config file",
        _cli("--config", lambda f: f["nan_cfg"]),
        1,
        ("epsilon must be finite", "nan"),
    ),
    CliCase(
        "cli: broken YAML",
        _cli("--config", lambda f: f["broken"]),
        1,
        ("cannot parse config file", "broken.yaml"),
    ),
    CliCase(
        "cli: YAML list, not a mapping",
        _cli("--config", lambda f: f["list"]),
        1,
        ("must hold a mapping", "list.yaml", "list"),
    ),
    CliCase(
        "cli: config suffix .ini", _cli("--config", lambda f: f["cfg"]), 1, ("must end in .yaml", "cfg.ini")
    ),
    CliCase("cli: NaN in the images", _cli(data="nan"), 1, ("nan.npy", "NaN or Inf")),
    CliCase(
        "cli: float images outside [0, 1]", _cli(data="big"), 1, ("big.npy", "must be in [0, 1]", "max 2.997")
    ),
    CliCase("cli: complex images", _cli(data="complex"), 1, ("complex.npy", "complex64")),
    CliCase("cli: a single image", _cli(data="one"), 1, ("at least 2 images", "got 1")),
    CliCase("cli: --limit 0", _cli("--limit", "0"), 1, ("limit must be a positive integer", "0")),
    CliCase("cli: --fraction 1.5", _cli("--fraction", "1.5"), 1, ("fraction must be in (0, 1]", "1.5")),
    CliCase(
        "cli: --device gpu",
        lambda f: ["evaluate", "--model", str(f["model"]), "--data", str(f["x"]), "--device", "gpu"],
        2,
        ("--device must be", "'gpu'"),
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.name)
def test_cli_bad_input(case: CliCase, cli_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_files["dir"] / "out.pt"
    if out.exists():
        out.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["--quiet", *case.argv(cli_files)])
    _, err = capsys.readouterr()
    assert code == case.code, f"{case.name}: exit {code}, stderr {err!r}"
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, f"{case.name}: expected one error line; got {err!r}"
    missing = [f for f in case.fragments if f not in lines[0]]
    assert not missing, f"{case.name}: stderr {lines[0]!r} lacks {missing}"
    assert not out.exists(), f"{case.name}: an output file was written"


def test_catalogue_size() -> None:
    """The issue asks for >= 25 distinct bad inputs across ops, purify, config and CLI."""
    names = [c.name for c in OP_CASES + API_CASES] + [c.name for c in CLI_CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    assert len(names) >= 25
