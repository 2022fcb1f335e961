"""The ``cbd-fast`` command line (cbd_fast/app/cli.py): every subcommand end to end on a tiny model and
data in a temp dir, config precedence, every model form, and bad inputs (one clear line,
non-zero exit, no output file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cbd_fast.app import cli
from cbd_fast.evaluation.models import FMNISTNet

KW = {"width": 4, "feature_dim": 16}
KW_JSON = json.dumps(KW)
FAST = ["--set", "epochs=1", "--set", "steps=1", "--set", "batch_size=16"]
FACTORY = "cbd_fast.evaluation.models:FMNISTNet"
REPO = Path(__file__).resolve().parents[2]


def nan_net() -> nn.Module:
    """A factory whose features are NaN: purify must refuse it before any output is written."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 4), _NaN())


class _NaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny classifier in every form, unlabeled data as a tensor file and a PNG folder, labels."""
    from PIL import Image
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = FMNISTNet(**KW).eval()
    torch.save(net.state_dict(), d / "sd.pt")
    save_file(net.state_dict(), str(d / "sd.safetensors"))
    torch.save(net, d / "whole.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net.backbone), str(d / "backbone.ts"))
        torch.jit.save(torch.jit.script(net), str(d / "net.ts"))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=g)
    torch.save(x, d / "x.pt")
    np.save(d / "labels.npy", (torch.arange(32) % 10).numpy())
    (d / "imgs" / "sub").mkdir(parents=True)
    for i in range(16):
        Image.fromarray(x[i, 0].numpy()).save(d / "imgs" / ("sub" if i % 2 else ".") / f"{i:02d}.png")
    return {
        "dir": d,
        "sd": d / "sd.pt",
        "st": d / "sd.safetensors",
        "whole": d / "whole.pt",
        "ts": d / "backbone.ts",
        "net_ts": d / "net.ts",
        "x": d / "x.pt",
        "labels": d / "labels.npy",
        "imgs": d / "imgs",
    }


def factory_args(files: dict[str, Path], weights: str = "sd") -> list[str]:
    """``--model`` options of the factory form: FMNISTNet(**KW) with the weights ``files[weights]``."""
    return ["--model", FACTORY, "--factory-kwargs", KW_JSON, "--weights", str(files[weights])]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _load_sd(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ purify


def test_purify_factory_with_config_set_precedence_and_report(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "purify:\n  epochs: 3\n  steps: 1\n  epsilon: 4/255\n  batch_size: 16\n  clean_term: none\n"
    )
    out, rep = tmp_path / "purified.pt", tmp_path / "report"
    code, stdout, err = run(
        [
            "purify",
            *factory_args(files, "st"),
            "--feature-layer",
            "backbone",
            "--data",
            files["x"],
            "--limit",
            "24",
            "--config",
            cfg,
            "--set",
            "epochs=1",
            "--set",
            "lr=2e-3",
            "--out",
            out,
            "--report",
            rep,
            "--trigger",
            "badnets",
            "--report-samples",
            "16",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert "purified model written to" in stdout and "report written to" in stdout
    assert "health after epoch 1 (label-free" in stdout and "k-NN agreement" in stdout
    assert err == ""  # --quiet: no bars, no warnings
    purified, original = _load_sd(out), _load_sd(files["sd"])
    assert set(purified) == set(original)
    assert any(not torch.equal(purified[k], original[k]) for k in original if k.startswith("backbone"))
    assert all(
        torch.equal(purified[k], original[k]) for k in original if k.startswith("head")
    )  # head untouched
    assert out.with_suffix(".safetensors").is_file()

    doc = json.loads((rep / "report.json").read_text())
    assert doc["config"]["epochs"] == 1  # --set beats the file
    assert doc["config"]["steps"] == 1 and doc["config"]["clean_term"] == "none"  # from the file
    assert doc["config"]["epsilon"] == pytest.approx(4 / 255)  # "4/255" parsed as a number
    assert doc["config"]["lr"] == pytest.approx(2e-3)  # "2e-3" parsed as a number
    assert doc["config"]["temperature"] == 0.5 and doc["config"]["progress"] is False  # default; --quiet
    assert len(doc["history"]) == 1 and doc["history"][0]["images"] == 24
    assert {"health_knn", "health_cka", "health_rank", "health_spread"} <= set(doc["history"][0])
    assert doc["extra"]["model"]["form"] == "factory" and doc["extra"]["data"]["count"] == 24
    assert doc["projection"]["stats"]["before"]["count"] == {"clean": 16, "adversarial": 16, "triggered": 16}
    PIL = pytest.importorskip("PIL.Image")
    assert doc["figures"] == ["loss_curves.png", "throughput.png", "features_2d.png"]
    for name in doc["figures"]:
        with PIL.open(rep / name) as im:
            im.verify()
        with PIL.open(rep / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_purify_report_diagnostic_and_evaluation_wiring(files, tmp_path, capsys, monkeypatch):
    """--diagnostic hands the ORIGINAL model (features + classifier), trigger and target to
    cbd_fast.evaluation.diagnostics (stubbed here: the real one is tested in tests/evaluation and costs
    30 PGD runs);
    --eval-data/--eval-labels give ACC/ASR before and after."""
    from cbd_fast.evaluation import diagnostics

    seen = {}

    def fake(encoder, images, **kwargs):
        seen.update(kwargs, images=images.shape, features=encoder(images).shape)
        return {"n": len(images), "stub": True}

    monkeypatch.setattr(diagnostics, "evocation_diagnostic", fake)
    rep = tmp_path / "rep"
    code, _, err = run(
        ["purify", *factory_args(files), "--feature-layer", "backbone", "--data", files["x"], "--limit", "16",
         "--out", tmp_path / "m.pt", "--report", rep, "--trigger", "sig", "--target", "2", "--diagnostic",
         "--eval-data", files["x"], "--eval-labels", files["labels"], "--eval-limit", "20",
         "--report-samples", "8", *FAST, "-q"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert seen["images"] == (8, 1, 28, 28) and seen["features"] == (8, 16)
    assert isinstance(seen["classifier"], FMNISTNet) and seen["target"] == 2 and callable(seen["trigger"])
    doc = json.loads((rep / "report.json").read_text())
    assert doc["diagnostic"] == {"n": 8, "stub": True}
    for phase in ("before", "after"):
        ev = doc["evaluation"][phase]
        assert ev["n"] == 20 and ev["trigger"] == "sig" and ev["target"] == 2 and 0 <= ev["acc"] <= 1
    assert 0 <= doc["evaluation"]["before"]["asr"] <= 1


def _accuracy_by_hand(files: dict[str, Path], mean: float, std: float) -> tuple[float, float]:
    """ACC of the ``sd`` classifier on the ``x`` images standardised with ``mean`` / ``std``, and on
    them as given; asserts the two differ (so a check can tell them apart)."""
    net = FMNISTNet(**KW)
    net.load_state_dict(_load_sd(files["sd"]))
    net.eval()
    x, y = torch.load(files["x"]).float() / 255, torch.from_numpy(np.load(files["labels"]))
    with torch.no_grad():
        acc_std = (net((x - mean) / std).argmax(1) == y).float().mean().item()
        acc_raw = (net(x).argmax(1) == y).float().mean().item()
    assert acc_std != acc_raw
    return acc_std, acc_raw


def test_purify_input_standardisation_reaches_the_run_and_the_report(files, tmp_path, capsys):
    """--set input_mean/input_std: the run and the report's evaluation read the model on standardised
    images; the saved model and the record carry no wrapper."""
    rep = tmp_path / "rep"
    code, _, err = run(
        ["purify", *factory_args(files), "--feature-layer", "backbone", "--data", files["x"], "--limit", "16",
         "--out", tmp_path / "m.pt", "--report", rep, "--eval-data", files["x"],
         "--eval-labels", files["labels"], "--report-samples", "8",
         "--set", "input_mean=[0.5]", "--set", "input_std=[0.25]", *FAST, "-q"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads((rep / "report.json").read_text())
    assert "inputs standardised (mean 0.5, std 0.25)" in doc["extra"]["features"]
    acc_std, _ = _accuracy_by_hand(files, 0.5, 0.25)
    assert doc["evaluation"]["before"]["acc"] == pytest.approx(acc_std)
    assert set(_load_sd(tmp_path / "m.pt")) == set(_load_sd(files["sd"]))  # the model as it came, no wrapper


def test_purify_head_option_measures_changed_predictions(files, tmp_path, capsys):
    """--head NAME: the health check measures the predictions of the model's own head (printed and in
    the record); --head none: no such figure."""
    common = ["--feature-layer", "backbone", "--data", files["x"], "--limit", "16", *FAST]
    code, out, err = run(
        ["purify", *factory_args(files), *common, "--head", "head", "--out", tmp_path / "a.pt"], capsys
    )
    assert code == 0, err
    assert "changed predictions" in out and "head: FMNISTNet.head" in out
    record = json.loads((tmp_path / "a.record.json").read_text())
    assert "health_head_change" in json.dumps(record) and record["head"] == "FMNISTNet.head"
    code, out, err = run(
        ["purify", *factory_args(files), *common, "--head", "none", "--out", tmp_path / "b.pt"], capsys
    )
    assert code == 0, err
    assert "changed predictions" not in out


def test_report_options_without_report_warn(files, tmp_path, capsys):
    code, _, err = run(
        ["purify", "--model", files["ts"], "--data", files["x"], "--limit", "16", "--out", tmp_path / "m.ts",
         "--trigger", "badnets", *FAST, "-q"],
        capsys,
    )  # fmt: skip
    assert code == 0 and "warning: --trigger only shape the report" in err


def test_purify_torchscript_from_image_folder(files, tmp_path, capsys):
    out = tmp_path / "bb.ts"
    code, stdout, err = run(
        ["purify", "--model", files["ts"], "--data", files["imgs"], "--out", out, *FAST, "-q"], capsys
    )
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        back = torch.jit.load(str(out))
        orig = torch.jit.load(str(files["ts"]))
    assert isinstance(back, torch.jit.ScriptModule)
    x = torch.rand(2, 1, 28, 28)
    assert back(x).shape == (2, 16) and not torch.allclose(back(x), orig(x))
    assert "(torchscript;" in stdout


def test_purify_pickled_module_needs_trust_pickle_and_saves_a_module(files, tmp_path, capsys):
    out = tmp_path / "whole_purified.pt"
    argv = [
        "purify",
        "--model",
        files["whole"],
        "--feature-layer",
        "backbone",
        "--data",
        files["x"],
        "--fraction",
        "0.5",
        "--out",
        out,
        "--no-safetensors",
        *FAST,
        "-q",
    ]
    code, _, err = run(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "error: refused to load" in err and "FMNISTNet" in err and "--trust-pickle" in err
    assert not out.exists()
    code, stdout, err = run([*argv, "--trust-pickle"], capsys)
    assert code == 0, err
    assert "warning:" in err and "runs code from the file" in err
    model = torch.load(out, weights_only=False)
    assert isinstance(model, FMNISTNet) and not out.with_suffix(".safetensors").exists()


def test_purify_verbose_logs_and_shows_progress(files, tmp_path, capsys):
    code, _, err = run(
        [
            "purify",
            *factory_args(files),
            "--feature-layer",
            "backbone",
            "--data",
            files["x"],
            "--limit",
            "16",
            "--out",
            tmp_path / "v.pt",
            *FAST,
            "-v",
        ],
        capsys,
    )
    assert code == 0, err
    assert "info: loaded factory model" in err and "info: data: 16 images" in err


# ------------------------------------------------------------------------------------------ bad input


def _bad_cases(files: dict[str, Path], tmp: Path) -> dict[str, tuple[list, str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "empty" / "readme.txt").write_text("no images")
    mixed = tmp / "mixed"
    mixed.mkdir(exist_ok=True)
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((30, 28), np.uint8)).save(mixed / "b.png")
    (tmp / "junk.pt").write_bytes(b"definitely not a model")
    (tmp / "bad.yaml").write_text("epochs: 1\nwarmup: 3\n")
    base = [
        *factory_args(files),
        "--feature-layer",
        "backbone",
    ]
    data = ["--data", files["x"]]
    return {
        "missing model": (["--model", tmp / "nope.pt", *data], "model file not found"),
        "model does not load": (["--model", tmp / "junk.pt", *data], "cannot load model"),
        "weights do not fit": (["--model", FACTORY, "--weights", files["sd"], *data], "do not fit the model"),
        "bad factory kwargs": (["--model", FACTORY, "--factory-kwargs", "{width: 4", *data], "JSON object"),
        "missing data": ([*base, "--data", tmp / "nodata.pt"], "data not found"),
        "no images": ([*base, "--data", tmp / "empty"], "no images"),
        "mixed sizes": ([*base, "--data", mixed], "different sizes: .*a.png is 28x28, .*b.png is 28x30"),
        "unknown --set key": (
            [*base, *data, "--set", "warmup=3"],
            "unknown config key 'warmup' .*valid keys: epsilon",
        ),
        "unknown file key": (
            [*base, *data, "--config", tmp / "bad.yaml"],
            "unknown config key 'warmup' \\(from config",
        ),
        "bad value": ([*base, *data, "--set", "epsilon=-1"], "invalid config: epsilon must be >= 0"),
        "missing config": ([*base, *data, "--config", tmp / "none.yaml"], "config file not found"),
        "no feature layer": ([*base[:-1], "neck", *data], "feature layer 'neck' not found .*backbone, head"),
        "nan features": (["--model", "tests.app.test_cli:nan_net", *data], "non-finite"),
        "no head": ([*base, *data, "--head", "neck"], "head 'neck' is not a submodule of FMNISTNet"),
        "out folder missing": (
            [*base, *data, "--out", tmp / "no" / "dir" / "m.pt"],
            "output folder does not exist",
        ),
    }


BAD = [
    "missing model",
    "model does not load",
    "weights do not fit",
    "bad factory kwargs",
    "missing data",
    "no images",
    "mixed sizes",
    "unknown --set key",
    "unknown file key",
    "bad value",
    "missing config",
    "no feature layer",
    "nan features",
    "no head",
    "out folder missing",
]


@pytest.mark.parametrize("case", BAD)
def test_purify_bad_input_one_line_nonzero_no_output(files, tmp_path, capsys, case):
    argv, match = _bad_cases(files, tmp_path)[case]
    out = tmp_path / "out.pt"
    if "--out" not in argv:
        argv = [*argv, "--out", out]
    code, stdout, err = run(["purify", *argv, *FAST, "-q"], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cbd-fast: error: ")
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not out.exists() and not out.with_suffix(".safetensors").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_usage_errors_exit_2_with_one_line(capsys):
    code, _, err = run(["purify", "--model", "x"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "required" in err
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = run([], capsys)
    assert code == 2 and "usage" in err


def test_verbose_error_prints_traceback(files, tmp_path, capsys):
    code, _, err = run(
        ["purify", "--model", tmp_path / "nope.pt", "--data", files["x"], "--out", tmp_path / "o.pt", "-v"],
        capsys,
    )
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("cbd-fast: error:")


# ------------------------------------------------------------------------------------------ config


def test_config_files_and_set_parsing(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 2, "epsilon": "8/255"}))
    (tmp_path / "c.toml").write_text("[purify]\nepochs = 4\nlr = 0.001\n")
    (tmp_path / "c.yml").write_text("")
    assert cli.load_config_file(tmp_path / "c.json") == {"epochs": 2, "epsilon": pytest.approx(8 / 255)}
    assert cli.load_config_file(tmp_path / "c.toml") == {"epochs": 4, "lr": 0.001}
    assert cli.load_config_file(tmp_path / "c.yml") == {}
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(cli.CLIError, match="must end in"):
        cli.load_config_file(tmp_path / "c.ini")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(cli.CLIError, match="cannot parse config file"):
        cli.load_config_file(tmp_path / "broken.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(cli.CLIError, match="mapping"):
        cli.load_config_file(tmp_path / "list.yaml")

    parsed = cli.parse_set_options(
        [
            "epochs=3",
            "epsilon=8/255",
            "lr=1e-3",
            "backend=null",
            "device=cuda:0",
            "compile=true",
            "clean-term=none",
        ]
    )
    assert parsed == {
        "epochs": 3,
        "epsilon": pytest.approx(8 / 255),
        "lr": 1e-3,
        "backend": None,
        "device": "cuda:0",
        "compile": True,
        "clean_term": "none",
    }
    with pytest.raises(cli.UsageError, match="key=value"):
        cli.parse_set_options(["epochs"])

    cfg = cli.merge_config({"epochs": 2, "steps": 7}, {"epochs": 4}, quiet=True)
    assert (cfg.epochs, cfg.steps, cfg.progress, cfg.temperature) == (4, 7, False, 0.5)
    with pytest.raises(cli.CLIError, match="unknown config keys 'a', 'b' \\(from --set\\); valid keys: "):
        cli.merge_config({}, {"b": 1, "a": 2})

    # the paper preset is the base; the file and --set still apply on top
    paper = cli.merge_config({"epochs": 2}, {"lr": 0.02}, preset="paper")
    assert (paper.adversary, paper.clean_term, paper.optimizer, paper.epochs, paper.lr) == (
        "pgd",
        "none",
        "sgd",
        2,
        0.02,
    )
    assert paper.epsilon == pytest.approx(8 / 255) and paper.step_size == pytest.approx(2 / 255)
    with pytest.raises(cli.CLIError, match="--preset must be 'defaults' or 'paper'; got 'papr'"):
        cli.merge_config({}, {}, preset="papr")


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_acc_and_asr(files, tmp_path, capsys):
    js = tmp_path / "eval.json"
    code, stdout, err = run(
        [
            "evaluate",
            *factory_args(files),
            "--data",
            files["x"],
            "--labels",
            files["labels"],
            "--trigger",
            "badnets",
            "--target",
            "0",
            "--json",
            js,
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert stdout.startswith("ACC ") and "ASR " in stdout and "on 32 images" in stdout
    result = json.loads(js.read_text())
    net = FMNISTNet(**KW)
    net.load_state_dict(_load_sd(files["sd"]))
    from cbd_fast.evaluation import backdoors as attacks
    from cbd_fast.evaluation import metrics

    x = torch.load(files["x"]).float() / 255
    y = torch.from_numpy(np.load(files["labels"]))
    assert result["acc"] == pytest.approx(metrics.accuracy(net, x, y))
    assert result["asr"] == pytest.approx(
        metrics.attack_success_rate(net, x, y, attacks.make_trigger("badnets"), 0)
    )


def test_evaluate_labels_file_with_subset(files, capsys):
    code, stdout, err = run(
        ["evaluate", "--model", files["net_ts"], "--data", files["x"], "--labels", files["labels"],
         "--limit", "20", "--json", "-", "-q"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["n"] == 20


def test_evaluate_needs_labels_and_reads_them_from_files(files, tmp_path, capsys):
    code, _, err = run(["evaluate", "--model", files["net_ts"], "--data", files["x"], "-q"], capsys)
    assert code == 1 and "carries no labels" in err.strip().splitlines()[-1]
    torch.save({"images": torch.load(files["x"]), "labels": torch.arange(32) % 10}, tmp_path / "xy.pt")
    code, stdout, err = run(
        ["evaluate", "--model", files["net_ts"], "--data", tmp_path / "xy.pt", "--json", "-", "-q"], capsys
    )
    assert code == 0 and json.loads(stdout)["n"] == 32 and "asr" not in json.loads(stdout)


def test_evaluate_input_standardisation(files, capsys):
    """--input-mean/--input-std: the model reads (x - mean) / std, as purify's input_mean does."""
    base = [
        "evaluate",
        *factory_args(files),
        "--data",
        files["x"],
        "--labels",
        files["labels"],
        "--json",
        "-",
        "-q",
    ]
    acc_std, acc_raw = _accuracy_by_hand(files, 0.5, 0.25)
    code, stdout, err = run([*base, "--input-mean", "0.5", "--input-std", "0.25"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["acc"] == pytest.approx(acc_std)
    code, stdout, err = run(base, capsys)
    assert code == 0 and json.loads(stdout)["acc"] == pytest.approx(acc_raw)
    code, _, err = run([*base, "--input-mean", "0.5"], capsys)
    assert code == 2 and "both or neither" in err
    code, _, err = run([*base, "--input-mean", "0.5,x", "--input-std", "1,1"], capsys)
    assert code == 2 and "--input-mean must be comma-separated numbers" in err and "'0.5,x'" in err


def test_evaluate_device_option(files, capsys):
    base = ["evaluate", "--model", files["net_ts"], "--data", files["x"], "--labels", files["labels"], "-q"]
    code, _, err = run([*base, "--device", "gpu0"], capsys)
    assert code == 2 and "--device must be" in err
    if not torch.cuda.is_available():
        code, _, err = run([*base, "--device", "cuda"], capsys)
        assert code == 1 and err.strip().splitlines()[-1].endswith("no CUDA device is visible")
    code, stdout, _ = run([*base, "--device", "cpu"], capsys)
    assert code == 0 and stdout.startswith("ACC ")


def test_evaluate_fashion_mnist_dataset(files, capsys):
    from cbd_fast.evaluation import fmnist as data

    root = Path(os.environ.get("CBD_FAST_FMNIST_ROOT", data.DEFAULT_ROOT))
    if not (root / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    code, stdout, err = run(
        [
            "evaluate",
            *factory_args(files),
            "--dataset",
            "fashion-mnist",
            "--limit",
            "64",
            "--trigger",
            "blended",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert "on 64 images" in stdout and "trigger blended" in stdout


# ------------------------------------------------------------------------------------------ info, demo


def test_info(capsys):
    code, stdout, _ = run(["info"], capsys)
    assert code == 0 and "torch" in stdout and "cpp" in stdout
    code, stdout, _ = run(["-q", "info", "--json"], capsys)
    assert code == 0 and isinstance(json.loads(stdout), dict)


def test_demo_delegates_all_arguments(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("cbd_fast.app.demo")
    fake.main = lambda argv=None: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "cbd_fast.app.demo", fake)
    assert cli.main(["demo", "--help"]) == 0
    assert cli.main(["--quiet", "demo", "--attack", "blended", "--quick"]) == 0
    assert seen == [["--help"], ["--attack", "blended", "--quick", "--quiet"]]
    fake.main = lambda argv=None: 3
    assert cli.main(["demo"]) == 3


def test_demo_missing_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cbd_fast.app.demo", None)  # import fails as if the module were absent
    code, _, err = run(["demo"], capsys)
    assert (
        code == 1
        and err.strip()
        == "cbd-fast: error: the demo is not available in this install (cbd_fast.app.demo is missing)"
    )


def test_version_and_help(capsys):
    code, stdout, _ = run(["--version"], capsys)
    import cbd_fast

    assert code == 0 and stdout.strip() == f"cbd_fast {cbd_fast.__version__}"
    code, stdout, _ = run(["purify", "--help"], capsys)
    assert code == 0 and "--feature-layer" in stdout and "--set KEY=VALUE" in stdout


# ------------------------------------------------------------------------------------------ subprocess


def test_python_m_cbd_fast_subprocess_smoke(files, tmp_path):
    out = tmp_path / "sp.pt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbd_fast",
            "purify",
            *factory_args(files),
            "--feature-layer",
            "backbone",
            "--data",
            str(files["x"]),
            "--limit",
            "16",
            "--out",
            str(out),
            *FAST,
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "purified model written to" in proc.stdout
