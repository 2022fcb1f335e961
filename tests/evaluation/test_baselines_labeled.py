"""cbd_fast.evaluation.baselines: the label-using paper baselines (fine_tuning, fine_pruning, nad,
anp, i_bau).

On tiny backdoored models (2,000 BadNets-poisoned training images, 2 epochs, three architectures) with a
200-image labeled defender set: every method returns a NEW model, leaves its inputs untouched, changes
the weights, runs on fmnistnet / bn_gap_cnn / tiny_vit, and refuses bad hyper-parameters by name. Then
each method's own mechanism: fine_tuning is supervised_finetune's recipe, fine-pruning zeroes the
channels it reports and obeys its stopping rule, NAD's distillation term matters, ANP's hooks are the
paper's parametrisation and its pruning rule is exact, and I-BAU's implicit hypergradient matches the
closed form on a quadratic and is non-zero (and changes the result) on a network.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from cbd_fast.evaluation.architectures import Classifier, build
from cbd_fast.evaluation.backdoors import BadNets, poison_dataset, train_classifier
from cbd_fast.evaluation.baselines import (
    LABELED_BASELINES,
    adversarial_unlearning,
    anp,
    fine_pruning,
    fine_tuning,
    i_bau,
    implicit_hypergradient,
    nad,
    no_defense,
    plain_finetune,
    supervised_finetune,
)
from cbd_fast.evaluation.baselines.distillation import attention_map, distillation_layers
from cbd_fast.evaluation.baselines.fineprune import prune_site
from cbd_fast.evaluation.baselines.neuron_pruning import _Perturbation, anp_neurons, prune_neurons
from cbd_fast.evaluation.fmnist import load_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {
    "fmnistnet": {},
    "bn_gap_cnn": {"width": 4},
    "tiny_vit": {"depth": 2, "dim": 16, "heads": 2},
}

#: tiny settings: every method in well under a second on these models
FAST = {
    "fine_tuning": {"epochs": 1},
    "fine_pruning": {"epochs": 1, "acc_drop": 0.1},
    "nad": {"epochs": 1, "teacher_epochs": 1},
    "anp": {"iterations": 5, "threshold": 0.99},
    "i_bau": {"rounds": 1, "K": 2},
}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    try:
        train = load_fashion_mnist("train", limit=2200)
    except FileNotFoundError as exc:  # only the data-free tests (quadratic, attention map) run then
        pytest.skip(f"Fashion-MNIST missing ({exc}); apt-get install -y dataset-fashion-mnist")
    poisoned, _ = poison_dataset(train.subset(slice(0, 2000)), BadNets(), rate=0.1, seed=0)
    return {
        "poisoned_images": poisoned.images,
        "poisoned_labels": poisoned.labels,
        "x": train.images[2000:2200].clone(),
        "y": train.labels[2000:2200].clone(),
    }


@pytest.fixture(scope="module")
def models(data) -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """arch -> (backdoored model, its state_dict snapshot)."""
    from cbd_fast.evaluation.fmnist import ImageSet

    poisoned = ImageSet(data["poisoned_images"], data["poisoned_labels"])
    out = {}
    for name, kw in ARCHS.items():
        torch.manual_seed(0)
        model = build(name, feature_dim=16, **kw)
        train_classifier(model, poisoned, epochs=2, seed=0)
        out[name] = (model, _snapshot(model))
    return out


# ------------------------------------------------------------------ the common contract


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", sorted(LABELED_BASELINES))
def test_new_model_inputs_untouched_weights_changed(method: str, arch: str, models, data) -> None:
    model, before = models[arch]
    x, y = data["x"], data["y"]
    x0, y0 = x.clone(), y.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "pruned nothing" must not happen here
        out = LABELED_BASELINES[method](model, x, y, seed=0, **FAST[method])
    assert out is not model and type(out) is type(model)
    assert not out.training
    assert _same(_snapshot(model), before), f"{method} modified its input model"
    assert torch.equal(x, x0) and torch.equal(y, y0), f"{method} modified its input images/labels"
    after = _snapshot(out)
    assert after.keys() == before.keys()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert changed, f"{method} on {arch} returned the weights unchanged"
    with torch.no_grad():
        assert torch.isfinite(out(x[:4])).all()


def test_same_seed_same_result(models, data) -> None:
    model, _ = models["bn_gap_cnn"]
    for method in ("fine_pruning", "anp", "i_bau"):
        a = LABELED_BASELINES[method](model, data["x"], data["y"], seed=3, **FAST[method])
        b = LABELED_BASELINES[method](model, data["x"], data["y"], seed=3, **FAST[method])
        assert _same(_snapshot(a), _snapshot(b)), method


BAD = [
    ("fine_tuning", "epochs", 0),
    ("fine_tuning", "lr", 0.0),
    ("fine_tuning", "lr", float("nan")),
    ("fine_tuning", "momentum", 1.0),
    ("fine_tuning", "batch_size", 2.5),
    ("fine_tuning", "weight_decay", -1e-4),
    ("fine_tuning", "seed", -1),
    ("fine_pruning", "acc_drop", 1.5),
    ("fine_pruning", "acc_drop", -0.01),
    ("fine_pruning", "holdout", 0.0),
    ("fine_pruning", "holdout", 1.0),
    ("fine_pruning", "epochs", -1),
    ("fine_pruning", "layer", "no.such.layer"),
    ("nad", "betas", ()),
    ("nad", "betas", (500.0, -1.0, 1000.0)),
    ("nad", "betas", "500"),
    ("nad", "power", 0.0),
    ("nad", "teacher_epochs", 0),
    ("nad", "layers", ["backbone.0"]),  # one layer for three betas
    ("nad", "layers", ["nope", "backbone.1", "backbone.2"]),
    ("anp", "eps", 1.0),
    ("anp", "eps", -0.1),
    ("anp", "alpha", 1.2),
    ("anp", "threshold", -0.2),
    ("anp", "iterations", 0),
    ("anp", "mask_lr", 0.0),
    ("anp", "batch_size", 1),
    ("anp", "noise_steps", True),
    ("i_bau", "rounds", 0),
    ("i_bau", "K", -1),
    ("i_bau", "lr", -1e-3),
    ("i_bau", "inner_lr", 0.0),
    ("i_bau", "radius", 0.0),
    ("i_bau", "portion", 0.0),
    ("i_bau", "portion", 1.5),
    ("i_bau", "fp_step", float("inf")),
]


@pytest.mark.parametrize(("method", "name", "value"), BAD, ids=[f"{m}-{n}-{v!r}" for m, n, v in BAD])
def test_bad_hyper_parameters_are_refused_by_name(method: str, name: str, value, models, data) -> None:
    model, before = models["fmnistnet"]
    with pytest.raises(ValueError) as err:
        LABELED_BASELINES[method](model, data["x"], data["y"], **{name: value})
    assert name in str(err.value)
    assert _same(_snapshot(model), before)


@pytest.mark.parametrize("method", sorted(LABELED_BASELINES))
def test_bad_data_and_unknown_keywords(method: str, models, data) -> None:
    model, _ = models["fmnistnet"]
    f = LABELED_BASELINES[method]
    x, y = data["x"], data["y"]
    with pytest.raises(ValueError, match="same length"):
        f(model, x, y[:-1])
    with pytest.raises(TypeError, match="labels"):
        f(model, x, y.float())
    with pytest.raises(TypeError, match="images"):
        f(model, x[:, 0], y)
    with pytest.raises(TypeError, match="model"):
        f("not a model", x, y)
    with pytest.raises(TypeError):
        f(model, x, y, no_such_hyper_parameter=1)


@pytest.mark.parametrize("method", ["fine_pruning", "nad", "anp"])
def test_methods_that_need_layers_ask_for_a_backbone(method: str, data) -> None:
    bare = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(TypeError, match="backbone"):
        LABELED_BASELINES[method](bare, data["x"], data["y"])


def test_the_original_baselines_are_still_exported() -> None:
    for f in (no_defense, plain_finetune, supervised_finetune, adversarial_unlearning):
        assert callable(f)


# ------------------------------------------------------------------ fine-tuning


def test_fine_tuning_is_supervised_finetunes_recipe(models, data) -> None:
    model, _ = models["fmnistnet"]
    out = fine_tuning(model, data["x"], data["y"], epochs=2, seed=1)
    bb, hd = supervised_finetune(model.backbone, model.head, data["x"], data["y"], epochs=2, seed=1)
    ref = {
        **{f"backbone.{k}": v for k, v in bb.state_dict().items()},
        **{f"head.{k}": v for k, v in hd.state_dict().items()},
    }
    assert _same(_snapshot(out), ref)


# ------------------------------------------------------------------ fine-pruning


class _Reversed(nn.Module):
    """Registers its layers in the reverse of the order they run: the trace, not the order, must count."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(1, 6, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x)))).flatten(1)


def test_fine_pruning_sites_per_architecture(models, data) -> None:
    x = data["x"][:2]
    fm = prune_site(models["fmnistnet"][0], x)
    assert fm.kind == "conv" and fm.channels == 64
    assert fm.description == "backbone.2.0 (Conv2d) -> backbone.2.1 (BatchNorm2d) -> backbone.2.2 (ReLU)"
    bn = prune_site(models["bn_gap_cnn"][0], x)
    assert bn.kind == "conv" and bn.channels == 16 and "backbone.4.1 (BatchNorm2d)" in bn.description
    res = prune_site(build("resnet8", feature_dim=8, width=4), x)
    assert res.description == "backbone.6 (Conv2d) -> backbone.7 (BatchNorm2d) -> backbone.8 (ReLU)"
    vit = prune_site(models["tiny_vit"][0], x)  # its only conv is the patch embedding: not a unit
    assert vit.kind == "linear_input" and "backbone.proj" in vit.description and vit.channels == 16
    mlp = prune_site(build("mlp", feature_dim=8, hidden=12), x)
    assert mlp.kind == "linear_input" and mlp.channels == 12
    custom = Classifier(_Reversed(), 6)
    site = prune_site(custom, x)
    assert site.description == "backbone.conv (Conv2d) -> backbone.bn (BatchNorm2d) -> backbone.act (ReLU)"
    forced = prune_site(models["fmnistnet"][0], x, layer="backbone.4")
    assert forced.kind == "linear_input" and forced.channels == 576
    with pytest.raises(ValueError, match="Conv2d or a Linear"):
        prune_site(models["fmnistnet"][0], x, layer="backbone.2.1")


def test_fine_pruning_zeroes_the_channels_it_prunes_and_obeys_the_stopping_rule(models, data) -> None:
    model, _ = models["fmnistnet"]
    info: dict = {}
    out = fine_pruning(model, data["x"], data["y"], epochs=0, acc_drop=0.04, info=info)
    pruned = info["pruned"]
    assert 0 < len(pruned) < 64
    assert info["acc_base"] - info["acc_pruned"] <= 0.04 + 1e-9
    # the paper's order: increasing mean activation
    act = torch.tensor(info["activation"])
    assert torch.all(act[pruned].max() <= act[[c for c in range(64) if c not in pruned]].min())
    bn = out.backbone[2][1]
    assert torch.all(bn.weight[pruned] == 0) and torch.all(bn.bias[pruned] == 0)
    kept = [c for c in range(64) if c not in pruned]
    assert torch.all(bn.weight[kept] != 0)
    seen = []
    h = out.backbone[2][2].register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        out(torch.rand(5, 1, 28, 28))
    h.remove()
    assert seen[0][:, pruned].abs().max() == 0  # silenced post-ReLU on any input

    # after fine-tuning the pruned weights are still exactly zero
    info2: dict = {}
    tuned = fine_pruning(model, data["x"], data["y"], epochs=1, acc_drop=0.04, info=info2)
    assert info2["pruned"] == pruned
    assert torch.all(tuned.backbone[2][1].weight[pruned] == 0) and torch.all(
        tuned.backbone[2][1].bias[pruned] == 0
    )
    assert not torch.equal(tuned.backbone[2][1].weight[kept], bn.weight[kept])

    # a looser rule prunes at least as much; 1.0 prunes all but one channel
    info3: dict = {}
    fine_pruning(model, data["x"], data["y"], epochs=0, acc_drop=1.0, info=info3)
    assert len(info3["pruned"]) == 63


def test_fine_pruning_linear_fallback_zeroes_input_columns(models, data) -> None:
    """The input columns of the ViT's projection; they get gradients, so they must be re-zeroed after
    every fine-tuning step (a ReLU net's dead channels would stay zero by themselves)."""
    model, before = models["tiny_vit"]
    info: dict = {}
    out = fine_pruning(model, data["x"], data["y"], epochs=1, acc_drop=0.5, info=info)
    assert info["kind"] == "linear_input" and info["pruned"]
    w = out.backbone.proj.weight
    assert torch.all(w[:, info["pruned"]] == 0)
    kept = [c for c in range(w.shape[1]) if c not in info["pruned"]]
    assert not torch.equal(w[:, kept], before["backbone.proj.weight"][:, kept])  # fine-tuned


# ------------------------------------------------------------------ NAD


def test_nad_layers_per_architecture(models, data) -> None:
    x = data["x"][:2]
    assert distillation_layers(models["fmnistnet"][0], 3, x) == ["backbone.0", "backbone.1", "backbone.2"]
    assert distillation_layers(models["bn_gap_cnn"][0], 3, x) == ["backbone.2", "backbone.3", "backbone.4"]
    assert distillation_layers(models["tiny_vit"][0], 3, x) == ["backbone.blocks.0", "backbone.blocks.1"]
    assert distillation_layers(build("resnet8", feature_dim=8, width=4), 3, x) == [
        "backbone.3",
        "backbone.4",
        "backbone.5",
    ]
    assert distillation_layers(build("mlp", feature_dim=8, hidden=12), 2, x) == ["backbone.3", "backbone.5"]


def test_attention_map() -> None:
    a = torch.randn(3, 5, 4, 4)
    am = attention_map(a)
    assert am.shape == (3, 16)
    torch.testing.assert_close(am.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(am, attention_map(2.0 * a), atol=1e-5, rtol=0)  # scale-free
    expected = a.pow(2).sum(1).flatten(1)
    torch.testing.assert_close(am, expected / expected.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert attention_map(torch.randn(3, 7, 6)).shape == (3, 7)  # tokens [B, T, E]
    assert attention_map(torch.randn(3, 9)).shape == (3, 9)


def test_nad_distillation_term_matters(models, data) -> None:
    model, _ = models["fmnistnet"]
    info: dict = {}
    with_at = nad(model, data["x"], data["y"], epochs=1, teacher_epochs=1, info=info)
    without = nad(model, data["x"], data["y"], epochs=1, teacher_epochs=1, betas=(0.0, 0.0, 0.0))
    assert info["layers"] == ["backbone.0", "backbone.1", "backbone.2"] and info["betas"] == [
        500.0,
        1000.0,
        1000.0,
    ]
    assert not _same(_snapshot(with_at), _snapshot(without))


# ------------------------------------------------------------------ ANP


def test_anp_neurons_per_architecture(models, data) -> None:
    x = data["x"][:2]
    # the BatchNorms, and the Linear 576 -> 128 that has no norm of its own; never the head
    assert list(anp_neurons(models["fmnistnet"][0], x)) == [
        "backbone.0.1",
        "backbone.1.1",
        "backbone.2.1",
        "backbone.4",
    ]
    assert list(anp_neurons(models["bn_gap_cnn"][0], x)) == [f"backbone.{i}.1" for i in range(5)]
    res = anp_neurons(build("resnet8", feature_dim=8, width=4), x)
    assert all(isinstance(m, nn.BatchNorm2d) for m in res.values()) and len(res) == 10
    vit = anp_neurons(models["tiny_vit"][0], x)
    assert {"backbone.blocks.0.ln1", "backbone.blocks.0.qkv", "backbone.blocks.0.proj", "backbone.ln"} <= set(
        vit
    )
    assert "head" not in vit
    mlp = anp_neurons(build("mlp", feature_dim=8, hidden=12), x)
    assert list(mlp) == ["backbone.1", "backbone.3", "backbone.5"]  # no norm: the Linear units
    custom = Classifier(_Reversed(), 6)
    assert list(anp_neurons(custom, x)) == ["backbone.bn"]  # conv -> bn traced, not registered


@pytest.mark.parametrize("arch", ["fmnistnet", "tiny_vit"])
def test_anp_hook_is_the_papers_parametrisation(arch: str, models, data) -> None:
    """mask m, noises (d, xi) on a layer == its weight times (m + d) and its bias times (1 + xi)."""
    model = copy.deepcopy(models[arch][0]).eval()
    ref = copy.deepcopy(model)
    units = anp_neurons(model, data["x"][:2])
    pert = _Perturbation(units)
    g = torch.Generator().manual_seed(0)
    ref_units = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in units.items():
            c = m.weight.shape[0]
            pert.mask[name].copy_(torch.rand(c, generator=g))
            pert.noise_w[name].copy_(torch.rand(c, generator=g) - 0.5)
            pert.noise_b[name].copy_(torch.rand(c, generator=g) - 0.5)
            r = ref_units[name]
            r.weight.mul_((pert.mask[name] + pert.noise_w[name]).view(-1, *[1] * (r.weight.dim() - 1)))
            if r.bias is not None:
                r.bias.mul_(1 + pert.noise_b[name])
        pert.perturbed = True
        got = model(data["x"][:8])
        pert.remove()
        want = ref(data["x"][:8])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_anp_prunes_exactly_the_masks_at_or_below_the_threshold(models, data) -> None:
    model, before = models["bn_gap_cnn"]
    info: dict = {}
    out = anp(model, data["x"], data["y"], iterations=20, eps=0.4, threshold=0.95, info=info)
    assert info["n_pruned"] > 0 and info["n_neurons"] == 4 + 8 + 8 + 16 + 16  # its 5 BatchNorms
    modules = dict(out.named_modules())
    for name, values in info["masks"].items():
        values = torch.tensor(values)
        assert values.min() >= 0 and values.max() <= 1
        low = (values <= 0.95).nonzero().flatten().tolist()
        assert info["pruned"].get(name, []) == low
        w = modules[name].weight
        assert torch.all(w[low] == 0)
        keep = [c for c in range(len(values)) if c not in low]
        assert torch.equal(w[keep], before[f"{name}.weight"][keep])  # the rest is the original model
        assert torch.equal(modules[name].bias, before[f"{name}.bias"])  # biases kept, as in the paper
    # prune_neurons re-applies another threshold to the same masks
    again, pruned = prune_neurons(model, info["masks"], 0.0)
    assert sum(map(len, pruned.values())) <= info["n_pruned"]


def test_anp_warns_when_it_prunes_nothing(models, data) -> None:
    model, before = models["fmnistnet"]
    with pytest.warns(RuntimeWarning, match="pruned no neuron"):
        out = anp(model, data["x"], data["y"], iterations=1, threshold=0.0)
    assert _same(_snapshot(out), before)


# ------------------------------------------------------------------ I-BAU


def test_implicit_hypergradient_matches_the_closed_form_on_a_quadratic() -> None:
    """L_in(w, t) = w'Aw/2 - w'Bt, so w*(t) = A^-1 B t; L_out = |w - c|^2/2 + d't:
    dL_out/dt = d + B' A^-1 (w* - c)."""
    torch.set_default_dtype(torch.float64)
    try:
        A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
        B = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0]])
        c = torch.tensor([0.7, -0.4])
        d = torch.tensor([0.1, 0.2, -0.3])
        t = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
        w_star = torch.linalg.solve(A, B @ t.detach())

        def inner(w):
            return 0.5 * w[0] @ A @ w[0] - w[0] @ B @ t

        def outer(w):
            return 0.5 * (w[0] - c).pow(2).sum() + d @ t

        exact = d + B.T @ torch.linalg.solve(A, w_star - c)
        hyper, direct = implicit_hypergradient(inner, outer, [w_star], [t], K=400, fp_step=0.1)
        torch.testing.assert_close(hyper[0], exact, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(direct[0], d)
        # K = 1: v = dL_out/dw, implicit term = fp_step * B' v (one Neumann term)
        hyper1, _ = implicit_hypergradient(inner, outer, [w_star], [t], K=1, fp_step=0.1)
        torch.testing.assert_close(hyper1[0], d + 0.1 * B.T @ (w_star - c))
        hyper0, _ = implicit_hypergradient(inner, outer, [w_star], [t], K=0)
        torch.testing.assert_close(hyper0[0], d)
    finally:
        torch.set_default_dtype(torch.float32)


def test_i_bau_hypergradient_is_nonzero_and_changes_the_update(models, data) -> None:
    model, _ = models["fmnistnet"]
    info: dict = {}
    full = i_bau(model, data["x"], data["y"], rounds=1, K=5, portion=0.5, info=info)
    assert info["implicit_norm"] > 1e-3 * info["direct_norm"] > 0
    assert 0 < info["delta_norm"][0] <= 5.0 + 1e-4  # the L2 bound
    info0: dict = {}
    plain = i_bau(model, data["x"], data["y"], rounds=1, K=0, portion=0.5, info=info0)
    assert info0["implicit_norm"] == 0
    assert not _same(_snapshot(full), _snapshot(plain))
