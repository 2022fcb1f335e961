"""The purification record (cbd_fast/app/record.py) and ``cbd-fast verify-record``: written by
``cbd-fast purify --out``, its hashes check out, and a modified model, data or record fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cbd_fast.app import cli
from cbd_fast.app import record as rec
from cbd_fast.evaluation.models import FMNISTNet

KW = {"width": 4, "feature_dim": 16}
FAST = ["--set", "epochs=1", "--set", "steps=1", "--set", "batch_size=16", "--set", "adversary=pgd"]


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def purified(tmp_path_factory) -> dict[str, Path]:
    """One CLI purification (factory + safetensors weights, a tensor file of images, labels for an
    evaluation): its output files and record."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("record")
    torch.manual_seed(0)
    save_file(FMNISTNet(**KW).state_dict(), str(d / "sd.safetensors"))
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.save(x, d / "x.pt")
    np.save(d / "labels.npy", (torch.arange(32) % 10).numpy())
    argv = [
        "purify", "--model", "cbd_fast.evaluation.models:FMNISTNet", "--factory-kwargs", json.dumps(KW),
        "--weights", d / "sd.safetensors", "--feature-layer", "backbone", "--data", d / "x.pt",
        "--out", d / "purified.pt", "--report", d / "rep", "--eval-data", d / "x.pt", "--eval-labels",
        d / "labels.npy", "--eval-limit", "16", "--report-samples", "8", *FAST, "-q",
    ]  # fmt: skip
    code = cli.main([str(a) for a in argv])
    assert code == 0
    return {
        "dir": d,
        "weights": d / "sd.safetensors",
        "x": d / "x.pt",
        "out": d / "purified.pt",
        "st": d / "purified.safetensors",
        "record": d / "purified.record.json",
        "card": d / "purified.record.md",
    }


def test_purify_writes_a_record_whose_hashes_check_out(purified):
    doc = rec.read_record(purified["record"])
    assert doc["record_version"] == rec.RECORD_VERSION and doc["content_sha256"] == rec.content_sha256(doc)
    outs = {Path(e["path"]).name: e["sha256"] for e in doc["output_model"]["files"]}
    assert outs == {
        "purified.pt": rec.sha256_file(purified["out"]),
        "purified.safetensors": rec.sha256_file(purified["st"]),
    }
    (weights,) = doc["input_model"]["files"]
    assert weights["role"] == "weights" and weights["sha256"] == rec.sha256_file(purified["weights"])
    data = doc["data"]
    assert data["count"] == 32 and data["shape"] == [1, 28, 28] and data["dtype"] == "uint8"
    assert data["tensor_sha256"] == rec.tensor_sha256(torch.load(purified["x"], weights_only=True))
    assert data["files"][0]["sha256"] == rec.sha256_file(purified["x"])
    assert doc["config"]["epochs"] == 1 and doc["config"]["adversary"] == "pgd"
    assert doc["features"] == "output of submodule 'backbone', 16-d"
    assert {"cbd_fast", "torch", "python"} <= set(doc["versions"])
    assert doc["runtime"]["device"] == "cpu" and doc["runtime"]["amp_dtype"] == "float32"
    assert doc["runtime"]["backends"] == {"nt_xent": "cpp", "pgd_step": "cpp"}  # the compiled CPU kernels
    assert doc["runtime"]["backend_requested"] == "auto" and "torch" in doc["runtime"]["backends_available"]
    assert set(doc["health"]["final"]) >= {"health_knn", "health_cka", "health_rank", "health_spread"}
    assert set(doc["evaluation"]) == {"before", "after"} and 0 <= doc["evaluation"]["after"]["acc"] <= 1
    assert doc["losses"][0]["epoch"] == 1
    ok = rec.verify_record(
        purified["record"], [purified["out"], purified["st"]], inputs=[purified["weights"]]
    )
    assert ok.ok and len(ok.checks) == 4, ok.lines()
    assert rec.verify_record(doc, data=purified["x"], check_recorded_paths=True).ok
    assert rec.verify_record(doc, images=torch.load(purified["x"], weights_only=True)).ok


def test_model_card_and_html_report_show_the_hashes(purified):
    card = purified["card"].read_text()
    doc = rec.read_record(purified["record"])
    assert card.startswith("# Model card: purified.pt")
    for entry in doc["output_model"]["files"] + doc["input_model"]["files"]:
        assert entry["sha256"] in card
    assert doc["data"]["tensor_sha256"] in card and "verify-record" in card
    assert "| before |" in card and "health_knn" in card
    page = (purified["dir"] / "rep" / "report.html").read_text()
    assert rec.sha256_file(purified["out"]) in page and "Purification record" in page


def test_verify_record_cli_passes_then_fails_on_a_modified_model(purified, tmp_path, capsys):
    code, out, err = run(
        ["verify-record", purified["record"], purified["out"], "--input", purified["weights"]], capsys
    )
    assert code == 0, err
    assert out.splitlines()[0].startswith("ok") and "verified: 3 check(s) passed" in out
    tampered = tmp_path / "purified.pt"
    data = bytearray(purified["out"].read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    tampered.write_bytes(bytes(data))
    code, out, err = run(["verify-record", purified["record"], tampered], capsys)
    assert code == 1
    assert "MISMATCH output purified.pt" in out and "differs from the recorded purified.pt" in out
    assert err.startswith("cbd-fast: error: verification failed: 1 of 2 check(s)")
    other = tmp_path / "other.bin"
    other.write_bytes(b"not a model")
    code, out, _ = run(["verify-record", purified["record"], other, "--json"], capsys)
    doc = json.loads(out)
    assert (
        code == 1
        and doc["ok"] is False
        and "matches none of the recorded output files" in doc["checks"][1]["note"]
    )
    code, out, err = run(["verify-record", purified["record"], tmp_path / "missing.pt"], capsys)
    assert code == 1 and "MISSING" in out


def test_an_edited_record_or_other_data_fails(purified, tmp_path, capsys):
    doc = rec.read_record(purified["record"])
    doc["config"]["epochs"] = 99  # someone "fixes" the record
    edited = tmp_path / "edited.record.json"
    edited.write_text(json.dumps(doc))
    code, out, _ = run(["verify-record", edited, purified["out"]], capsys)
    assert code == 1 and "MISMATCH record content" in out and "the record was edited" in out
    other = tmp_path / "x.pt"
    torch.save(torch.zeros(32, 1, 28, 28, dtype=torch.uint8), other)
    code, out, _ = run(["verify-record", purified["record"], "--data", other], capsys)
    assert code == 1 and "MISMATCH data x.pt" in out
    assert not rec.verify_record(purified["record"], images=torch.zeros(32, 1, 28, 28, dtype=torch.uint8)).ok


def test_verify_record_usage_and_bad_records(purified, tmp_path, capsys):
    code, _, err = run(["verify-record", purified["record"]], capsys)
    assert code == 2 and "give the MODEL file(s)" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(["verify-record", bad, purified["out"]], capsys)
    assert code == 1 and "is not a JSON record" in err and len(err.strip().splitlines()) == 1
    bad.write_text(json.dumps({"hello": 1}))
    code, _, err = run(["verify-record", bad, purified["out"]], capsys)
    assert code == 1 and "not a cbd_fast purification record" in err
    code, _, err = run(["verify-record", tmp_path / "nope.json", purified["out"]], capsys)
    assert code == 1 and "record not found" in err


def test_tensor_hash_covers_dtype_shape_and_values():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert rec.tensor_sha256(a) == rec.tensor_sha256(a.t().contiguous().t())  # strides do not matter
    assert rec.tensor_sha256(a) != rec.tensor_sha256(a.reshape(4, 3))
    assert rec.tensor_sha256(a) != rec.tensor_sha256(a.double())
    b = a.clone()
    b[1, 1] += 1e-6
    assert rec.tensor_sha256(a) != rec.tensor_sha256(b)
    assert rec.tensor_sha256(torch.zeros(0, 3)) != rec.tensor_sha256(torch.zeros(3, 0))
    assert len(rec.tensor_sha256(torch.ones(2, dtype=torch.bfloat16))) == 64
    with pytest.raises(TypeError, match="needs a torch.Tensor; got list"):
        rec.tensor_sha256([1, 2])
