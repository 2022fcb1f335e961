"""A fast CI smoke test of the demo path (cbd_fast.app.demo) on a small subset."""

from __future__ import annotations

import json

import pytest
import torch

from cbd_fast.app.demo import main, run_demo
from cbd_fast.evaluation.fmnist import DEFAULT_ROOT
from cbd_fast.evaluation.models import asset_path

pytestmark = pytest.mark.skipif(
    not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install -y dataset-fashion-mnist",
)


@pytest.mark.skipif(not asset_path("badnets", 0).is_file(), reason="shipped asset missing")
def test_demo_quick_runs_and_reports(tmp_path):
    torch.manual_seed(0)
    out = run_demo(
        "badnets",
        quick=True,
        quiet=True,
        report_dir=tmp_path / "rep",
        baselines=False,
        cache_dir=None,
        n_test=500,
        diagnostic=False,
    )
    res = out["results"]
    assert set(res) == {"no_defense", "cbd"}
    assert res["no_defense"]["asr"] > 0.9  # the shipped model is backdoored
    # the supervised model's own head is passed, so the default head term is on
    assert out["runtime"]["head_weight"] == 1.0 and out["runtime"]["clean_weight"] == 100.0
    for r in res.values():
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 and 0.0 <= r["der"] <= 1.0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep  # a complete report was written
    assert rep["extra"]["runtime"]["head_weight"] == 1.0  # the report says which weights ran
    json.dumps(out["results"])  # JSON-able


def test_demo_cli_rejects_unknown_attack(capsys):
    with pytest.raises(SystemExit):
        main(["--attack", "nope"])
    assert "nope" in capsys.readouterr().err


def test_shipped_assets_are_small():
    for p in asset_path("badnets", 0).parent.glob("*.pt"):
        assert p.stat().st_size < 400_000, p
