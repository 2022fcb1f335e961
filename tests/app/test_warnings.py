"""Warnings a person must see reach stderr, once each: a slower backend because the compiled kernels
cannot run, bfloat16 autocast emulated on a CPU without it, missing matplotlib, a pickled model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import cbd_fast
from cbd_fast.app import cli, report
from cbd_fast.core import purify as purify_mod
from cbd_fast.evaluation.models import FMNISTNet
from cbd_fast.ops import backends

KW = {"width": 4, "feature_dim": 16}
FAST = ["--set", "epochs=1", "--set", "steps=1", "--set", "batch_size=16", "--set", "adversary=pgd"]
API = dict(epochs=1, steps=1, batch_size=8, adversary="pgd", health="off", progress=False)


@pytest.fixture()
def no_kernels(monkeypatch):
    """The compiled extension 'failed to load': the automatic choice falls back to torch."""
    real = backends.backend_status

    def status(device="cpu", *args, **kwargs):
        out = dict(real(device, *args, **kwargs))
        out["cpp"] = out["cuda"] = "compiled extension not loaded: ImportError: undefined symbol"
        return out

    monkeypatch.setattr(backends, "backend_status", status)
    monkeypatch.setattr(purify_mod, "_WARNED", set())


def _enc() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())


def test_fallback_to_the_torch_backend_warns_once(no_kernels):
    x = torch.rand(16, 1, 8, 8)
    with pytest.warns(
        RuntimeWarning, match="cpp kernels cannot run here .*slower pure-PyTorch backend"
    ) as seen:
        cbd_fast.purify(_enc(), x, **API)
        cbd_fast.purify(_enc(), x, **API)
    assert sum("kernels cannot run here" in str(w.message) for w in seen) == 1
    with warnings.catch_warnings():  # a backend named by the user: their choice, no warning
        warnings.simplefilter("error")
        purify_mod._WARNED.clear()
        cbd_fast.purify(_enc(), x, backend="torch", **API)


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch):
    monkeypatch.setattr(purify_mod, "_WARNED", set())
    monkeypatch.setattr(purify_mod, "cpu_has_native_bf16", lambda: False)
    x = torch.rand(16, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="without native bfloat16 instructions") as seen:
        cbd_fast.purify(_enc(), x, amp_dtype="bfloat16", **API)
        cbd_fast.purify(_enc(), x, amp_dtype="bfloat16", **API)
    assert sum("bfloat16" in str(w.message) for w in seen) == 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("warn")
    torch.manual_seed(0)
    net = FMNISTNet(**KW).eval()
    torch.save(net.state_dict(), d / "sd.pt")
    torch.save(net, d / "whole.pt")
    torch.save(torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8), d / "x.pt")
    return d


def _purify(files, tmp_path, *extra) -> list[str]:
    return [
        "purify", "--model", "cbd_fast.evaluation.models:FMNISTNet", "--factory-kwargs", json.dumps(KW),
        "--weights", files / "sd.pt", "--feature-layer", "backbone", "--data", files / "x.pt",
        "--out", tmp_path / "m.pt", *FAST, "-q", *extra,
    ]  # fmt: skip


def test_cli_shows_fallback_and_missing_matplotlib_on_stderr_once(
    files, tmp_path, capsys, monkeypatch, no_kernels
):
    monkeypatch.setattr(report, "_matplotlib", lambda: None)
    monkeypatch.setattr(report, "_WARNED", set())
    code = cli.main([str(a) for a in _purify(files, tmp_path, "--report", tmp_path / "rep")])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = err.strip().splitlines()
    assert sum("kernels cannot run here" in line for line in lines) == 1
    assert sum("matplotlib is not installed" in line for line in lines) == 1
    assert all(line.startswith("cbd-fast: warning: ") for line in lines), lines
    assert "warning" not in out and (tmp_path / "rep" / "report.html").is_file()


def test_cli_pickled_model_warning_once_on_stderr(files, tmp_path, capsys):
    argv = [
        "purify", "--model", files / "whole.pt", "--trust-pickle", "--feature-layer", "backbone",
        "--data", files / "x.pt", "--out", tmp_path / "p.pt", "--no-safetensors", *FAST, "-q",
    ]  # fmt: skip
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.count("runs code from the file") == 1 and err.startswith("cbd-fast: warning: ")
    assert "runs code" not in out
