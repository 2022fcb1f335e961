"""The purification report (cbd_fast/app/report.py): JSON content, valid PNGs, the 2-D projection."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cbd_fast.app import report

HISTORY = [
    {
        "epoch": e,
        "loss": 3.0 - 0.2 * e,
        "loss_pull": 2.5 - 0.2 * e,
        "loss_clean": 0.1 * e,
        "attack_loss": 3.1,
        "images": 64,
        "seconds": 0.5,
        "images_per_s": 128.0 + e,
    }
    for e in (1, 2, 3)
]


def _projections(seed: int = 0, dim: int = 12) -> dict:
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(40, dim))
    trig_dir = np.zeros(dim)
    trig_dir[0] = 6.0
    return {
        "before": {
            "clean": clean,
            "adversarial": clean + trig_dir * 0.8,
            "triggered": rng.normal(size=(30, dim)) + trig_dir,
        },
        "after": {
            "clean": clean,
            "adversarial": clean + 0.1,
            "triggered": torch.from_numpy(rng.normal(size=(30, dim))),
        },
    }


def _check_png(path) -> None:
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(path) as im:
        im.verify()
    with PIL.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 20  # not a blank canvas


def test_write_report_files_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    out = report.write_report(
        tmp_path / "rep",
        config={"epsilon": 8 / 255, "steps": 5},
        history=HISTORY,
        evaluation={"before": {"acc": 0.9, "asr": 0.98}, "after": {"acc": 0.89, "asr": 0.03}},
        diagnostic={"target_share": 0.42, "chance": 0.1},
        projections=_projections(),
        extra={"note": np.float32(1.5), "tensor": torch.tensor([1.0, float("nan")])},
    )
    assert out == tmp_path / "rep" / "report.json"
    doc = json.loads(out.read_text())
    assert doc["figures"] == ["loss_curves.png", "throughput.png", "features_2d.png"]
    for name in doc["figures"]:
        _check_png(tmp_path / "rep" / name)
    assert doc["config"] == {"epsilon": 8 / 255, "steps": 5}
    assert {"cbd_fast", "torch", "python", "platform"} <= set(doc["versions"])
    assert "extension_built" in doc["build"]
    assert doc["history"] == HISTORY
    assert doc["timings"]["total_seconds"] == pytest.approx(1.5)
    assert doc["timings"]["images_per_s_mean"] == pytest.approx(130.0)
    assert doc["evaluation"]["after"]["asr"] == 0.03 and doc["diagnostic"]["target_share"] == 0.42
    assert doc["extra"] == {"note": 1.5, "tensor": [1.0, None]}
    stats = doc["projection"]["stats"]
    before = stats["before"]["mean_cos_to_triggered_centroid"]
    assert before["adversarial"] > before["clean"]  # the fixture's adversaries sit near the trigger
    assert stats["before"]["count"] == {"clean": 40, "adversarial": 40, "triggered": 30}
    assert doc["html"] == "report.html"
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(
        [*doc["figures"], "report.json", "report.html"]
    )


def test_report_without_matplotlib_writes_json_and_html_and_warns_once(tmp_path, monkeypatch, capsys):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setattr(report, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed") as seen:
        out = report.write_report(tmp_path, config={}, history=HISTORY, projections=_projections())
        report.write_report(tmp_path / "again", config={}, history=HISTORY)
    assert len([w for w in seen if "matplotlib" in str(w.message)]) == 1  # once per process
    doc = json.loads(out.read_text())
    assert doc["figures"] == [] and "matplotlib is not installed" in doc["notes"][0]
    assert doc["projection"]["explained_variance"][0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "report.html", "report.json"]
    assert "<svg" in (tmp_path / "report.html").read_text()  # the HTML figures need no matplotlib


def test_report_empty_history_and_dataclass_config(tmp_path):
    from cbd_fast.core.config import PurifyConfig

    out = report.write_report(tmp_path / "r", config=PurifyConfig(), history=[], html=False)
    assert not (tmp_path / "r" / "report.html").exists()
    doc = json.loads(out.read_text())
    assert doc["config"]["epsilon"] == pytest.approx(PurifyConfig().epsilon) and doc["history"] == []
    assert any("empty history" in n for n in doc["notes"]) and doc["projection"] is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"history": "nope"}, TypeError, "history must be a list of dicts"),
        ({"history": [], "config": 3}, TypeError, "config must be a dict"),
        ({"history": [], "projections": {"after": {}}}, ValueError, "before/clean"),
        (
            {
                "history": [],
                "projections": {"before": {"clean": np.zeros((4, 3)), "adversarial": np.zeros((4, 5))}},
            },
            ValueError,
            "feature dim 5, expected 3",
        ),
        ({"history": [], "projections": {"before": {"clean": np.zeros(4)}}}, ValueError, r"must be \[n, D\]"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path, kwargs, error, match):
    kwargs.setdefault("config", {})
    with pytest.raises(error, match=match):
        report.write_report(tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()


def test_project_2d_uses_one_basis_fitted_on_before_clean():
    proj = _projections(1)
    proj["after"] = {k: np.asarray(v) for k, v in proj["before"].items()}  # identical "after"
    out = report.project_2d(proj)
    for name in ("clean", "adversarial", "triggered"):
        assert np.allclose(out["points"]["before"][name], out["points"]["after"][name])
    assert np.allclose(out["points"]["before"]["clean"].mean(axis=0), 0.0, atol=1e-12)
    ev = out["explained_variance"]
    assert ev[0] >= ev[1] >= 0 and sum(ev) <= 1 + 1e-9
    one_d = report.project_2d({"before": {"clean": np.arange(6.0).reshape(6, 1)}}, normalize=False)
    assert one_d["points"]["before"]["clean"].shape == (6, 2)


def test_jsonable():
    from dataclasses import dataclass
    from pathlib import Path

    @dataclass
    class D:
        a: float = math.inf

    value = {
        "t": torch.tensor(2.5),
        "arr": np.arange(3),
        "nan": float("nan"),
        "d": D(),
        "p": Path("x"),
        "dev": torch.device("cpu"),
        1: (np.int64(3), {np.float64(1.0)}),
    }
    assert report.jsonable(value) == {
        "t": 2.5,
        "arr": [0, 1, 2],
        "nan": None,
        "d": {"a": None},
        "p": "x",
        "dev": "cpu",
        "1": [3, [1.0]],
    }
    json.dumps(report.jsonable(value), allow_nan=False)


def test_collect_projections_runs_the_attack_and_leaves_encoders_alone():
    pytest.importorskip("cbd_fast.core.attack")
    torch.manual_seed(0)
    before = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 6)
    )
    after = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 6)
    )
    after.train()
    before.eval()
    before[1].train()  # a mixed-mode module: each flag comes back as it was
    state = {k: v.clone() for k, v in after.state_dict().items()}
    x = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    trig = torch.rand(7, 1, 8, 8)
    proj = report.collect_projections(
        before,
        after,
        x,
        x_triggered=trig,
        config={"epsilon": 0.1, "step_size": 0.05, "steps": 2},
        n=16,
        batch_size=8,
    )
    assert set(proj) == {"before", "after"}
    for phase in proj.values():
        assert phase["clean"].shape == (16, 6) and phase["adversarial"].shape == (16, 6)
        assert phase["triggered"].shape == (7, 6) and phase["clean"].dtype == np.float64
        assert not np.allclose(phase["clean"], phase["adversarial"])  # the attack moved the features
    assert after.training and not before.training and before[1].training  # flags restored
    assert all(torch.equal(state[k], v) for k, v in after.state_dict().items())  # BN stats untouched
    with_fn = report.collect_projections(before, after, x[:4], feature_fn=lambda m, t: m(t)[:, :3], n=4)
    assert with_fn["after"]["clean"].shape == (4, 3)
    with pytest.raises(ValueError, match="x_clean"):
        report.collect_projections(before, after, torch.zeros(4, 8, 8))
