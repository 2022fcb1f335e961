"""``cbd-fast purify`` on every backbone family (timm ResNet / ConvNeXt / ViT, torchvision resnet50 /
vit_b_16, a Hugging Face ViT folder): random-initialised weights saved to local files in the test,
the features chosen automatically and printed, the head left as it was, the purification record
verified, and the output loadable again.

Skipped with a reason where timm / torchvision / transformers do not import (torchvision needs torch
2.14.1 here: ``scripts/test_backbones.sh`` runs this file in that venv with
``CBD_FAST_REQUIRE_BACKBONES=1``, where a skip is a failure).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cbd_fast.app import cli
from cbd_fast.app import model_io as modelio
from cbd_fast.app import record as rec
from tests.app._optional import require_module

FAST = [
    "--set", "epochs=1", "--set", "steps=1", "--set", "batch_size=16", "--set", "adversary=pgd",
    "--set", "health_images=16", "-q",
]  # fmt: skip


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bb")
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    torch.save(x, d / "x.pt")
    return d / "x.pt"


def _safetensors(module: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def _purify_and_verify(
    capsys, tmp_path: Path, model_args: list, images: Path, want: str, head: str | None, original: dict
) -> dict[str, torch.Tensor]:
    out = tmp_path / "purified.pt"
    capsys.readouterr()  # what the test itself printed (save_pretrained's bar)
    code, stdout, err = run(["purify", *model_args, "--data", images, "--out", out, *FAST], capsys)
    assert code == 0, err
    assert f"features: {want}\n" in stdout, stdout
    assert err == "", err  # -q: no bars, nothing to warn about
    purified = torch.load(out, map_location="cpu", weights_only=True)
    assert set(purified) == set(original)
    assert any(not torch.equal(purified[k], original[k]) for k in original)  # the backbone changed
    if head is not None:  # the classifier is not part of the features
        assert all(torch.equal(purified[k], original[k]) for k in original if k.startswith(head))
    record = tmp_path / "purified.record.json"
    code, stdout, err = run(["verify-record", record, out, out.with_suffix(".safetensors")], capsys)
    assert code == 0 and "verified: 3 check(s) passed" in stdout, stdout + err
    doc = rec.read_record(record)
    assert doc["features"] == want and doc["input_model"]["files"]
    return purified


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("test_resnet", "timm forward_features + avg pool, 96-d"),
        ("test_convnext", "timm forward_features + avg pool, 64-d"),
        ("test_vit", "timm forward_features + CLS token, 64-d"),
    ],
)
def test_cli_timm(name, want, images, tmp_path, capsys):
    timm = require_module("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    weights = _safetensors(model, tmp_path / "w.safetensors")
    args = ["--model", f"timm:{name}", "--factory-kwargs", '{"num_classes": 10}', "--weights", weights]
    args += ["--image-size", "32"]  # the test models' pretrained_cfg says 160
    # the standardisation the model declares, as a user passes it (without it purify warns)
    mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
    args += ["--set", f"input_mean={list(mean)}", "--set", f"input_std={list(std)}"]
    base, dim = want.rsplit(", ", 1)
    fmt = lambda v: ", ".join(f"{x:.4g}" for x in v)  # noqa: E731
    want = f"{base}, inputs standardised (mean {fmt(mean)}, std {fmt(std)}), {dim}"
    original = {k: v.clone() for k, v in model.state_dict().items()}
    purified = _purify_and_verify(capsys, tmp_path, args, images, want, None, original)
    loaded = modelio.load_model(
        f"timm:{name}", weights=tmp_path / "purified.safetensors", factory_kwargs={"num_classes": 10}
    )
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in purified.items())


@pytest.mark.parametrize(
    ("name", "kwargs", "want", "head"),
    [
        (
            "resnet50",
            {"num_classes": 10},
            "torchvision ResNet: input of .fc (global avg pool), 2048-d",
            "fc.",
        ),
        (
            "vit_b_16",
            {"num_classes": 10, "image_size": 32},
            "torchvision VisionTransformer: input of .heads (CLS token), 768-d",
            "heads.",
        ),
    ],
)
def test_cli_torchvision(name, kwargs, want, head, images, tmp_path, capsys):
    models = require_module("torchvision.models")
    torch.manual_seed(0)
    model = getattr(models, name)(**kwargs)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    args = [
        "--model",
        f"torchvision.models:{name}",
        "--factory-kwargs",
        json.dumps(kwargs),
        "--weights",
        weights,
    ]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _purify_and_verify(capsys, tmp_path, args, images, want, head, original)


def test_cli_transformers_vit_folder(images, tmp_path, capsys):
    transformers = require_module("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    want = "transformers ViTForImageClassification CLS token (last_hidden_state[:, 0]), 32-d"
    purified = _purify_and_verify(
        capsys, tmp_path, ["--model", folder], images, want, "classifier.", original
    )
    doc = rec.read_record(tmp_path / "purified.record.json")
    names = sorted(Path(e["path"]).name for e in doc["input_model"]["files"])
    assert names == ["config.json", "model.safetensors"] and doc["input_model"]["form"] == "transformers"
    # the purified weights load back into the same folder's architecture (hf: prefix form)
    back = modelio.load_model(f"hf:{folder}", weights=tmp_path / "purified.safetensors")
    assert type(back.module).__name__ == "ViTForImageClassification"
    assert all(torch.equal(back.module.state_dict()[k], v) for k, v in purified.items())
    assert modelio.expected_input_shape(back.module) == (3, 32, 32)


def test_transformers_folder_with_custom_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "auto_map": {"AutoModel": "x.Y"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    require_module("transformers")  # the folder is refused before transformers reads it
    with pytest.raises(modelio.ModelLoadError, match="names custom model code .*trust_remote_code=False"):
        modelio.load_model(tmp_path)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(modelio.ModelLoadError, match="has no config.json"):
        modelio.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="Hugging Face model folder not found"):
        modelio.load_model(f"hf:{tmp_path / 'nope'}")
