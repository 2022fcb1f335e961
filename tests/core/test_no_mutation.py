"""The user's encoder and data are never mutated: a property test over the public entry points.

For random set-ups (training or eval mode, a BatchNorm left in eval inside a training model, frozen
parameters, pre-existing ``.grad``, channels_last or uint8 data, inputs that require grad) each entry
point is called and everything the caller owns is compared before and after:

- modules: every state_dict entry (parameters AND buffers: values, dtype, device, strides, storage
  pointer, version counter), every submodule's ``training`` flag, every parameter's
  ``requires_grad`` and ``.grad`` (None stays None; a tensor keeps its values);
- tensors: values, dtype, device, strides, storage pointer, version counter, ``requires_grad``, ``.grad``;
- files (the CLI): the model and data files' bytes.

Entry points: ``purify``, ``Purifier.fit``, ``contrastive_pgd``, ``nt_xent``,
``nt_xent_value_and_grad``, ``pgd_init``, ``pgd_step`` (its ``grad``/``x_clean``; ``x_adv`` is in place by
contract), ``NTXentLoss``, the evaluation functions (``metrics.predict``/``accuracy``/
``evaluate_backdoor``/``linear_probe``, ``diagnostics.contrastive_adversaries``) and ``cbd-fast purify``
on files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import cbd_fast
from cbd_fast.app import cli
from cbd_fast.core.attack import contrastive_pgd
from cbd_fast.evaluation import diagnostics, metrics
from cbd_fast.ops import nt_xent, nt_xent_value_and_grad, pgd_init, pgd_step
from cbd_fast.ops.losses import NTXentLoss


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a purify run
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# ---- snapshots ------------------------------------------------------------------------------------------


def _tensor_state(t: torch.Tensor) -> dict[str, Any]:
    return {
        "values": t.detach().clone(),
        "dtype": t.dtype,
        "device": t.device,
        "shape": tuple(t.shape),
        "stride": t.stride(),
        "ptr": t.untyped_storage().data_ptr(),
        "version": t._version,
        "requires_grad": t.requires_grad,
        "grad": None if t.grad is None else t.grad.detach().clone(),
    }


def _module_state(m: nn.Module) -> dict[str, Any]:
    return {
        "entries": {k: _tensor_state(v) for k, v in m.state_dict(keep_vars=True).items()},
        "training": {name: sub.training for name, sub in m.named_modules()},
        "params": [name for name, _ in m.named_parameters()],
        "buffers": [name for name, _ in m.named_buffers()],
        "class": type(m),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _diff(before: Any, after: Any, path: str = "") -> list[str]:
    """Human-readable paths where two snapshots differ."""
    if isinstance(before, dict) and isinstance(after, dict) and before.keys() == after.keys():
        return [d for k in before for d in _diff(before[k], after[k], f"{path}.{k}" if path else str(k))]
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)) and len(before) == len(after):
        return [d for i, (x, y) in enumerate(zip(before, after)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if _same(before, after) else [f"{path}: {_short(before)} -> {_short(after)}"]


def _short(x: Any) -> str:
    return f"Tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)[:80]


def _assert_untouched(before: Any, after: Any, what: str) -> None:
    d = _diff(before, after)
    assert not d, f"{what} was mutated: " + "; ".join(d[:8])


# ---- the caller's objects --------------------------------------------------------------------------------


class Net(nn.Module):
    """[B, 1, 6, 6] -> [B, 8]: conv, BatchNorm (running stats), dropout, a buffer, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.register_buffer("offset", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1)) + self.offset


@st.composite
def setups(draw: st.DrawFn) -> dict[str, Any]:
    """A caller's model and images in one of many states."""
    torch.manual_seed(draw(st.integers(0, 100)))
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.1, 0.1)
    net.train(draw(st.booleans()))
    if draw(st.booleans()):
        net.bn.eval()  # a frozen BatchNorm inside a training model: the flag must survive
    if draw(st.booleans()):
        net.conv.requires_grad_(False)
    if draw(st.booleans()):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
    n = draw(st.sampled_from([4, 6, 9]))
    x = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(n))
    form = draw(st.sampled_from(["float", "uint8", "channels_last", "requires_grad"]))
    if form == "uint8":
        x = (x * 255).to(torch.uint8)
    elif form == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif form == "requires_grad":
        x.requires_grad_(True)
    return {"net": net, "x": x, "form": form}


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x


# ---- purify / Purifier -----------------------------------------------------------------------------------


@_settings(4)
@given(
    s=setups(),
    clean_term=st.sampled_from(["none", "feature_consistency", "contrastive_views"]),
    bn_policy=st.sampled_from(["train", "eval"]),
)
def test_purify_mutates_nothing(s: dict[str, Any], clean_term: str, bn_policy: str) -> None:
    net, x = s["net"], s["x"]
    before = (_module_state(net), _tensor_state(x))
    rng = torch.get_rng_state()
    out = cbd_fast.purify(
        net,
        x.detach() if x.requires_grad else x,
        epochs=1,
        batch_size=4,
        steps=1,
        progress=False,
        clean_term=clean_term,
        bn_policy=bn_policy,
    )
    _assert_untouched(before, (_module_state(net), _tensor_state(x)), "purify's encoder or data")
    assert torch.equal(torch.get_rng_state(), rng), "purify changed the caller's RNG state"
    assert out is not net and type(out) is Net
    assert all(p is not q for p, q in zip(out.parameters(), net.parameters()))
    # the copy is handed back with the caller's flags
    assert {n: m.training for n, m in out.named_modules()} == before[0]["training"]
    assert {n: p.requires_grad for n, p in out.named_parameters()} == {
        n: e["requires_grad"] for n, e in before[0]["entries"].items() if n in before[0]["params"]
    }


@_settings(2)
@given(s=setups())
def test_purifier_fit_on_a_dataset_mutates_nothing(s: dict[str, Any]) -> None:
    net = s["net"]
    x = _float(s["x"]).detach()
    items = [(x[i], i % 3) for i in range(x.shape[0])]  # (image, label) tuples, a list-backed Dataset

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return items[i]

    before = (_module_state(net), [_tensor_state(t) for t, _ in items])
    result = cbd_fast.Purifier(epochs=1, batch_size=4, steps=1, progress=False).fit(net, DS())
    _assert_untouched(before, (_module_state(net), [_tensor_state(t) for t, _ in items]), "Purifier.fit")
    assert result.encoder is not net


# ---- attack and ops --------------------------------------------------------------------------------------


@_settings(8)
@given(s=setups(), steps=st.integers(0, 2), random_start=st.booleans(), use_init=st.booleans())
def test_contrastive_pgd_mutates_nothing(
    s: dict[str, Any], steps: int, random_start: bool, use_init: bool
) -> None:
    net, x = s["net"], _float(s["x"])
    if s["form"] == "requires_grad":
        x.requires_grad_(True)
    with torch.no_grad():
        clean = torch.randn(x.shape[0], 8)
    x_init = torch.rand_like(x.detach()) if use_init else None
    owned = {"x": x, "clean": clean} | ({"x_init": x_init} if x_init is not None else {})
    before = (_module_state(net), {k: _tensor_state(v) for k, v in owned.items()})
    x_adv = contrastive_pgd(
        net,
        x,
        clean,
        epsilon=8 / 255,
        step_size=2 / 255,
        steps=steps,
        temperature=0.5,
        random_start=random_start,
        x_init=x_init,
    )
    after = (_module_state(net), {k: _tensor_state(v) for k, v in owned.items()})
    _assert_untouched(before, after, "contrastive_pgd's inputs")
    assert not x_adv.requires_grad and x_adv.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@st.composite
def feature_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = draw(st.integers(2, 9)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    g = torch.Generator().manual_seed(n * 100 + d)
    a = torch.randn(n, d, generator=g).to(dtype)
    b = torch.randn(n, d, generator=g).to(dtype)
    if draw(st.booleans()):
        a = torch.randn(d, n, generator=g).to(dtype).t()  # non-contiguous
    if draw(st.booleans()):
        a.requires_grad_(True)
        a.grad = torch.ones_like(a)
    if draw(st.booleans()):
        b.requires_grad_(True)
    return a, b


@_settings(10)
@given(ab=feature_pairs(), backend=st.sampled_from(cbd_fast.available_backends("cpu")))
def test_nt_xent_family_mutates_nothing(ab: tuple[torch.Tensor, torch.Tensor], backend: str) -> None:
    a, b = ab
    assume(not (backend == "triton" and a.dtype == torch.float64))  # triton serves 32/16-bit only
    before = (_tensor_state(a), _tensor_state(b))
    nt_xent(a, b, 0.5, backend=backend)
    NTXentLoss(0.5, backend=backend)(a, b)
    nt_xent_value_and_grad(a, b, 0.5, backend=backend)
    _assert_untouched(before, (_tensor_state(a), _tensor_state(b)), "nt_xent's inputs")


@_settings(10)
@given(
    shape=st.sampled_from([(3,), (2, 3, 4, 4), (1, 1, 1, 1)]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    channels_last=st.booleans(),
    backend=st.sampled_from(cbd_fast.available_backends("cpu")),
)
def test_pgd_ops_mutate_only_x_adv(
    shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, backend: str
) -> None:
    assume(not (backend == "triton" and dtype == torch.float64))  # triton serves 32/16-bit only
    g = torch.Generator().manual_seed(len(shape))
    x_clean = torch.rand(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    if channels_last and len(shape) == 4:
        x_clean, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x_clean, grad))
    before = (_tensor_state(x_clean), _tensor_state(grad))
    x_adv = pgd_init(x_clean, 8 / 255, generator=torch.Generator().manual_seed(0))
    assert x_adv.untyped_storage().data_ptr() != x_clean.untyped_storage().data_ptr()
    pgd_step(x_adv, grad, x_clean, 2 / 255, 8 / 255, backend=backend)
    _assert_untouched(
        before, (_tensor_state(x_clean), _tensor_state(grad)), "pgd_init/pgd_step's x_clean and grad"
    )


# ---- evaluation ------------------------------------------------------------------------------------------


@_settings(5)
@given(s=setups())
def test_evaluation_functions_mutate_nothing(s: dict[str, Any]) -> None:
    net, x = s["net"], _float(s["x"]).detach()
    labels = torch.arange(x.shape[0]) % 8
    owned = {"x": x, "labels": labels}
    before = (_module_state(net), {k: _tensor_state(v) for k, v in owned.items()})

    def check(what: str) -> None:
        after = (_module_state(net), {k: _tensor_state(v) for k, v in owned.items()})
        _assert_untouched(before, after, what)

    metrics.predict(net, x)
    check("metrics.predict")
    metrics.accuracy(net, x, labels)
    check("metrics.accuracy")
    metrics.evaluate_backdoor(net, x, labels, lambda im: im.clamp(0.1, 0.9), target=0)
    check("metrics.evaluate_backdoor")
    metrics.linear_probe(net, x, labels, num_classes=8, steps=2)
    check("metrics.linear_probe")
    diagnostics.contrastive_adversaries(net, x, epsilon=8 / 255, steps=1, batch_size=4)
    check("diagnostics.contrastive_adversaries")


# ---- the CLI on files ------------------------------------------------------------------------------------


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cli_purify_leaves_model_and_data_files_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model, data, out = tmp_path / "model.pt", tmp_path / "x.npy", tmp_path / "purified.pt"
    # a TorchScript archive: a pickled module would be refused without --trust-pickle
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Flatten())), str(model))
    np.save(data, np.random.default_rng(0).random((8, 1, 6, 6), dtype=np.float32))
    before = {p.name: (_digest(p), p.stat().st_mtime_ns) for p in (model, data)}
    code = cli.main(
        [
            "--quiet",
            "purify",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--set",
            "epochs=1",
            "--set",
            "steps=1",
            "--set",
            "batch_size=4",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert {p.name: (_digest(p), p.stat().st_mtime_ns) for p in (model, data)} == before
    assert out.exists()
