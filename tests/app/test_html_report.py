"""``report.html`` (cbd_fast/app/html_report.py): one self-contained file with every section, loss
curves per logged step (the history's ``steps``), and a page that headless Chromium renders into a
picture that is not blank (skipped without chromium; CI sets CBD_FAST_REQUIRE_CHROMIUM=1)."""

from __future__ import annotations

import html
import re
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import cbd_fast
from cbd_fast.app import html_report, report
from tests.app._optional import chromium


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16)
    )


@pytest.fixture(scope="module")
def run_and_report(tmp_path_factory):
    """A real 2-epoch run (5 batches per epoch, a logged step every 2 batches) and its report."""
    x = torch.rand(40, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    enc = _encoder()
    res = cbd_fast.Purifier(
        epochs=2, batch_size=8, steps=1, adversary="pgd", log_every=2, health_images=16, progress=False
    ).fit(enc, x)
    proj = report.collect_projections(enc, res.encoder, x, config=res.config, n=24)
    out = tmp_path_factory.mktemp("html") / "rep"
    evaluation = {
        "before": {"n": 100, "acc": 0.91, "asr": 0.97, "trigger": "badnets", "target": 0},
        "after": {"n": 100, "acc": 0.9, "asr": 0.04, "trigger": "badnets", "target": 0},
    }
    extra = {"features": res.features, "model": {"class": "Sequential", "source": "test"}}
    path = report.write_report(
        out,
        config=res.config.to_dict(),
        history=res.history,
        evaluation=evaluation,
        projections=proj,
        extra=extra,
    )
    return res, path.with_name("report.html")


def test_history_logs_a_step_every_log_every_batches(run_and_report):
    res, _ = run_and_report
    for entry in res.history:  # 40 training images (8 held out) in batches of 8: logged at 2, 4, 5
        steps = entry["steps"]
        assert [s["batch"] for s in steps] == [2, 4, 5] and [s["batches"] for s in steps] == [2, 2, 1]
        assert sum(s["images"] for s in steps) == entry["images"]
        for key in ("loss", "loss_pull", "loss_clean", "attack_loss"):
            mean = sum(s[key] * s["images"] for s in steps) / entry["images"]
            assert mean == pytest.approx(entry[key], rel=1e-6)  # the windows add up to the epoch
        assert all(s["images_per_s"] > 0 and s["epoch"] == entry["epoch"] for s in steps)


def test_html_is_self_contained_with_every_section(run_and_report):
    res, page_path = run_and_report
    page = page_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for forbidden in ("<script", "<link", "<img", "src=", "url(", "http://", "https://"):
        assert forbidden not in page.replace('xmlns="http://www.w3.org/2000/svg"', ""), forbidden
    for section in ("Loss", "Health", "Throughput", "Features before / after", "Evaluation", "Configuration"):
        assert f"<h2>{section}" in page, section
    assert page.count("<svg") >= 5
    assert "CBD loss terms per logged step (6 logged steps)" in page
    loss_svg = page[page.index("<h2>Loss</h2>") : page.index("<h2>Health</h2>")]
    lines = re.findall(r'<polyline[^>]*points="([^"]+)"', loss_svg)
    assert len(lines) == 4 and all(len(p.split()) == 6 for p in lines)  # 4 terms x 6 logged steps
    assert "97.00%" in page and "4.00%" in page  # the ACC/ASR table
    assert html.escape(res.features) in page and "k-NN agreement" in page and "min k-NN agreement 0.2" in page
    assert "<code>epsilon</code>" in page


def test_html_escapes_and_survives_missing_parts():
    page = html_report.render_html({"config": {"a<b": "<script>x</script>"}, "history": []})
    assert "<script>" not in page and "&lt;script&gt;" in page and "No epochs were run" in page
    svg = html_report.line_chart(
        [("s", [1, 2, 3], [1.0, float("nan"), None])], title="t", xlabel="x", ylabel="y"
    )
    assert svg.startswith("<svg") and "polyline" in svg
    assert "no data" in html_report.line_chart([("s", [], [])], title="t", xlabel="x", ylabel="y")
    pts = {"before": {"clean": np.zeros((3, 2))}}
    assert html_report.scatter_panels([("before", pts["before"])], title="t").count("<circle") == 3


def test_html_renders_in_headless_chromium(run_and_report, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    exe = chromium()
    _, page = run_and_report
    shot = tmp_path / "shot.png"
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with PIL.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert rgb.shape[:2] == (2000, 1200)
    assert rgb.std() > 20  # not a blank page
    colors = {tuple(c) for c in rgb.reshape(-1, 3)[::7].astype(int)}
    assert len(colors) > 50  # text, lines, fills: many distinct colours
    blue = np.array([0x1F, 0x77, 0xB4])
    assert (np.abs(rgb - blue).sum(-1) < 30).sum() > 200  # the charts' first series colour is drawn
