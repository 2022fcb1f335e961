"""Model loading/saving (cbd_fast/app/model_io.py): every form, the feature layer, atomic writes, bad
input. Hostile files: test_model_security.py."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from cbd_fast.app import model_io as modelio
from cbd_fast.core.files import atomic_output
from cbd_fast.evaluation.models import FMNISTNet

KW = {"width": 4, "feature_dim": 16}


def make_tiny(channels: int = 1, dim: int = 8) -> nn.Module:
    """A factory living in a test module (``tests.app.test_model_io:make_tiny``)."""
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, dim),
    )


class TimmLike(nn.Module):
    """A timm-style classifier: forward_features + forward_head(pre_logits=...)."""

    pretrained_cfg = {"input_size": (1, 12, 12)}

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.fixture()
def net() -> FMNISTNet:
    torch.manual_seed(0)
    return FMNISTNet(**KW).eval()


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


# ------------------------------------------------------------------------------------------ loading


def test_factory_with_pt_and_safetensors_weights(tmp_path, net, x):
    from safetensors.torch import save_file

    torch.save(net.state_dict(), tmp_path / "w.pt")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    for weights in ("w.pt", "w.safetensors"):
        loaded = modelio.load_model(
            "cbd_fast.evaluation.models:FMNISTNet", weights=tmp_path / weights, factory_kwargs=KW
        )
        assert loaded.form == "factory" and isinstance(loaded.module, FMNISTNet)
        assert _same(loaded.module, net, x)
        assert loaded.describe()["parameters"] == sum(p.numel() for p in net.parameters())


def test_factory_in_a_test_module_and_nested_prefixed_state_dict(tmp_path, x):
    torch.manual_seed(3)
    ref = make_tiny(dim=6)
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = modelio.load_model(
        "tests.app.test_model_io:make_tiny", weights=tmp_path / "ckpt.pth", factory_kwargs={"dim": 6}
    )
    assert _same(loaded.module, ref, x)
    assert any("state_dict" in n for n in loaded.notes) and any("module." in n for n in loaded.notes)


def test_factory_without_weights_notes_it():
    loaded = modelio.load_model("tests.app.test_model_io:make_tiny")
    assert loaded.weights is None and any("no --weights" in n for n in loaded.notes)


def test_torchscript_archive(tmp_path, net, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net.backbone), str(tmp_path / "bb.ts"))
    loaded = modelio.load_model(tmp_path / "bb.ts")
    assert loaded.form == "torchscript" and isinstance(loaded.module, torch.jit.ScriptModule)
    assert torch.allclose(loaded.module(x), net.backbone(x), atol=1e-6)


def test_pickled_module_is_refused_unless_trusted(tmp_path, net, x):
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(
        modelio.ModelLoadError, match="refused.*cbd_fast.evaluation.models.FMNISTNet.*--trust-pickle"
    ):
        modelio.load_model(tmp_path / "whole.pt")
    with pytest.warns(modelio.PickleTrustWarning, match="runs code from the file"):
        loaded = modelio.load_model(tmp_path / "whole.pt", trust_pickle=True)
    assert loaded.form == "pickle" and _same(loaded.module, net, x)
    assert loaded.trust_pickle and loaded.describe()["trust_pickle"] is True


def test_state_dict_file_is_never_unpickled_as_code(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", modelio.PickleTrustWarning)  # no trust warning for plain weights
        with pytest.raises(modelio.ModelLoadError, match="is a state_dict, not a model.*--weights"):
            modelio.load_model(tmp_path / "sd.pt")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("missing.pt", "model file not found"),
        ("cbd_fast.evaluation.models:NoSuchNet", "has no attribute 'NoSuchNet'"),
        ("no_such_pkg.mod:build", "cannot import 'no_such_pkg.mod'"),
        ("cbd_fast.evaluation.models:FEATURE_DIM", "not callable"),
        ("timm:resnet18", "timm"),
    ],
)
def test_bad_model_specs(spec, match):
    if spec.startswith("timm") and __import__("importlib").util.find_spec("timm") is not None:
        pytest.skip("timm is installed")
    with pytest.raises((modelio.ModelLoadError, FileNotFoundError), match=match):
        modelio.load_model(spec)


def test_garbage_and_folder_and_weights_only_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    with pytest.raises(modelio.ModelLoadError, match="junk.pt.*not a TorchScript archive"):
        modelio.load_model(tmp_path / "junk.pt")
    with pytest.raises(modelio.ModelLoadError, match="folder"):
        modelio.load_model(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(modelio.ModelLoadError, match="holds only weights"):
        modelio.load_model(tmp_path / "w.safetensors")


def test_weights_that_do_not_fit(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(modelio.ModelLoadError, match="shape mismatch"):
        modelio.load_model(
            "cbd_fast.evaluation.models:FMNISTNet", weights=tmp_path / "w.pt"
        )  # default width 16
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "w2.pt")
    with pytest.raises(modelio.ModelLoadError, match="missing key"):
        modelio.load_model(
            "cbd_fast.evaluation.models:FMNISTNet", weights=tmp_path / "w2.pt", factory_kwargs=KW
        )
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        modelio.load_model("cbd_fast.evaluation.models:FMNISTNet", weights=tmp_path / "nope.pt")
    with pytest.raises(modelio.ModelLoadError, match="failed"):
        modelio.load_model("cbd_fast.evaluation.models:FMNISTNet", factory_kwargs={"width": -1})


# ------------------------------------------------------------------------------------------ features


def test_feature_layer_stops_at_the_layer(net, x):
    fn = modelio.make_feature_fn(net, feature_layer="backbone")
    calls = []
    net.head.register_forward_hook(lambda *a: calls.append(1))
    feats = fn(net, x)
    assert feats.shape == (3, 16) and torch.allclose(feats, net.features(x))
    assert calls == []  # the head never ran
    assert not net.backbone._forward_hooks  # hook removed
    nested = modelio.make_feature_fn(net, feature_layer="backbone.3")  # the Flatten inside the backbone
    assert nested(net, x).shape == (3, 4 * 4 * 9)


def test_feature_layer_gradients_flow(net, x):
    fn = modelio.make_feature_fn(net, feature_layer="backbone")
    xi = x.clone().requires_grad_(True)
    fn(net, xi).sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0


def test_forward_features_and_expected_shape():
    m = TimmLike()
    fn = modelio.make_feature_fn(m, forward_features=True)
    assert fn(m, torch.rand(2, 1, 12, 12)).shape == (2, 3)
    assert modelio.expected_input_shape(m) == (1, 12, 12)
    assert modelio.expected_input_shape(FMNISTNet(**KW)) == (1, None, None)
    assert modelio.make_feature_fn(m) is None


def test_feature_option_errors(net):
    with pytest.raises(ValueError, match="feature layer 'neck' not found in FMNISTNet.*backbone, head"):
        modelio.make_feature_fn(net, feature_layer="neck")
    with pytest.raises(ValueError, match="no forward_features"):
        modelio.make_feature_fn(net, forward_features=True)
    with pytest.raises(ValueError, match="not both"):
        modelio.make_feature_fn(net, feature_layer="backbone", forward_features=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    with pytest.raises(ValueError, match="TorchScript"):
        modelio.make_feature_fn(scripted, feature_layer="backbone")


# ------------------------------------------------------------------------------------------ saving


def test_save_round_trip_every_form(tmp_path, net, x):
    torch.save(net, tmp_path / "whole.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), str(tmp_path / "ts.pt"))
        sources = {
            "pickle": modelio.load_model(tmp_path / "whole.pt", trust_pickle=True),
            "torchscript": modelio.load_model(tmp_path / "ts.pt"),
        }
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    sources["factory"] = modelio.load_model(
        "cbd_fast.evaluation.models:FMNISTNet", weights=tmp_path / "sd.pt", factory_kwargs=KW
    )
    for form, loaded in sources.items():
        out = tmp_path / f"out_{form}.pt"
        saved = modelio.save_model(loaded.module, out, loaded=loaded)
        assert saved["files"] == [str(out), str(out.with_suffix(".safetensors"))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if form == "factory":
                back = modelio.load_model(
                    "cbd_fast.evaluation.models:FMNISTNet", weights=out, factory_kwargs=KW
                )
            else:
                back = modelio.load_model(out, trust_pickle=form == "pickle")
        assert back.form == form and _same(back.module, net, x)
        st = modelio.load_model(
            "cbd_fast.evaluation.models:FMNISTNet", weights=out.with_suffix(".safetensors"), factory_kwargs=KW
        )
        assert _same(st.module, net, x)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_save_torchscript_falls_back_to_trace_then_state_dict(tmp_path, x):
    class Unscriptable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, *rest):  # *args: TorchScript cannot compile this signature
            return self.lin(x.flatten(1)[:, :4])

    m = Unscriptable()
    traced = modelio.save_model(m, tmp_path / "a.pt", form="torchscript", example_input=x)
    assert traced["form"] == "torchscript" and "traced" in traced["notes"][0]
    fallback = modelio.save_model(m, tmp_path / "b.pt", form="torchscript", safetensors=False)
    assert fallback["form"] == "state_dict" and fallback["files"] == [str(tmp_path / "b.pt")]
    assert set(torch.load(tmp_path / "b.pt", weights_only=True)) == {"lin.weight", "lin.bias"}


def test_save_safetensors_only_and_tied_weights(tmp_path):
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    m[1].weight = m[0].weight  # tied
    saved = modelio.save_model(m, tmp_path / "m.safetensors")
    assert saved["files"] == [str(tmp_path / "m.safetensors")]
    sd = modelio.load_state_dict_file(tmp_path / "m.safetensors")
    assert torch.equal(sd["0.weight"], sd["1.weight"])


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("previous complete version")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "previous complete version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    with (
        pytest.raises(FileNotFoundError, match="output folder does not exist"),
        atomic_output(tmp_path / "nope" / "m.pt"),
    ):
        pass


def test_clone_module_of_torchscript_gives_trainable_leaves(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    clone = modelio.clone_module(scripted)
    params = list(clone.parameters())
    assert all(p.is_leaf and p.requires_grad for p in params)
    clone(torch.rand(2, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in scripted.parameters())  # nothing leaked into the original
    frozen = FMNISTNet(**KW)
    frozen.head.weight.requires_grad_(False)
    assert not modelio.clone_module(frozen).head.weight.requires_grad


def test_save_model_does_not_move_caller_module(tmp_path):
    m = make_tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modelio.save_model(m, tmp_path / "t.pt", form="pickle", safetensors=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert os.path.getsize(tmp_path / "t.pt") > 0
    with pytest.raises(ValueError, match="form must be"):
        modelio.save_model(m, tmp_path / "t2.pt", form="onnx")
