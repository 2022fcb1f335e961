"""purify / Purifier end to end on CPU: a real (tiny) backdoor removed, the caller's objects untouched,
every data form, determinism, resume, feature_fn, bad inputs and the NaN guard."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import cbd_fast
from cbd_fast import Purifier, PurifyConfig, PurifyResult, purify
from cbd_fast.core import checkpoint as ckpt

# A fast config for behaviour tests (the backdoor test sets its own).
FAST = dict(epochs=1, batch_size=8, steps=2, progress=False)


class SmallEncoder(nn.Module):
    """Conv + BatchNorm + dropout encoder for 1x10x10 images -> 16-d features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(16 * 25, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Classifier(nn.Module):
    """A whole classifier: ``features`` is the backbone, ``forward`` returns logits."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = SmallEncoder()
        self.head = nn.Linear(16, 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


pytestmark = pytest.mark.usefixtures("one_thread")  # module-scoped, in tests/conftest.py


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 10, 10, generator=torch.Generator().manual_seed(seed))


def _encoder(seed: int = 0) -> SmallEncoder:
    torch.manual_seed(seed)
    return SmallEncoder()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- the backdoor test
class Backdoor:
    """4 binary-prototype classes + noise; a +-0.1 blended pattern trigger relabelled to class 0."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.protos = (torch.rand(4, 1, 10, 10, generator=g) < 0.5).float()
        self.pattern = (torch.rand(1, 1, 10, 10, generator=g) < 0.5).float() * 2 - 1
        self.x, self.y = self.sample(1024, g)
        self.x_test, self.y_test = self.sample(512, torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        self.model = Classifier()
        self.model.backbone.body[6].p = 0.0  # no dropout while planting the backdoor
        opt = torch.optim.Adam(self.model.parameters(), 3e-3)
        for _ in range(300):  # ~2 s: 20% of each batch is triggered and labelled 0
            i = torch.randint(0, 1024, (64,), generator=g)
            xb, yb = self.x[i].clone(), self.y[i].clone()
            xb[:13], yb[:13] = self.trigger(xb[:13]), 0
            loss = nn.functional.cross_entropy(self.model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.model.eval()

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,), generator=g)
        return (0.5 * self.protos[y] + 0.5 * torch.rand(n, 1, 10, 10, generator=g)).clamp(0, 1), y

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.1 * self.pattern).clamp(0, 1)

    @torch.no_grad()
    def measure(self, backbone: nn.Module) -> dict[str, float]:
        """ACC/ASR with the ORIGINAL head, the trigger's relative feature shift, the clean drift."""
        backbone.eval()
        head, orig = self.model.head, self.model.backbone
        fc, ft, f0 = backbone(self.x_test), backbone(self.trigger(self.x_test)), orig(self.x_test)
        nontarget = self.y_test != 0
        return {
            "acc": float((head(fc).argmax(1) == self.y_test).float().mean()),
            "asr": float((head(ft[nontarget]).argmax(1) == 0).float().mean()),
            "shift": float((ft - fc).norm(dim=1).mean() / fc.norm(dim=1).mean()),
            "drift": float((fc - f0).norm(dim=1).mean() / f0.norm(dim=1).mean()),
        }


@pytest.fixture(scope="module")
def backdoor() -> Backdoor:
    return Backdoor()


def test_purify_removes_a_backdoor_and_keeps_clean_behaviour(backdoor: Backdoor) -> None:
    before = backdoor.measure(backdoor.model.backbone)
    assert before["acc"] > 0.95 and before["asr"] > 0.9, before  # the backdoor is real
    # The package DEFAULTS (docs/method.md section 6), only the batch and epochs sized for 192
    # images (36 steps).
    cfg = PurifyConfig(batch_size=32, epochs=6, progress=False)
    unlabeled = backdoor.x[:192]  # no labels are passed
    purified = purify(backdoor.model.backbone, unlabeled, cfg)
    after = backdoor.measure(purified)
    assert after["asr"] < 0.3, (before, after)
    assert after["acc"] > 0.95, (before, after)
    assert after["shift"] < 0.6 * before["shift"], (before, after)
    assert after["drift"] < 0.35, (before, after)
    # Control: the same fine-tuning without the adversary leaves the backdoor in place.
    plain = backdoor.measure(purify(backdoor.model.backbone, unlabeled, cfg, adversary="none"))
    assert plain["asr"] > 0.8, plain


def test_purify_with_the_head_removes_the_backdoor_too(backdoor: Backdoor) -> None:
    """The defaults with the model's head known: the head term guides the fine-tuning (clean weight
    100, docs/method.md 4.23); the same limits as above."""
    before = backdoor.measure(backdoor.model.backbone)
    cfg = PurifyConfig(batch_size=32, epochs=6, progress=False)
    res = Purifier(cfg).fit(backdoor.model.backbone, backdoor.x[:192], head=backdoor.model.head)
    assert (res.runtime["head_weight"], res.runtime["clean_weight"]) == (1.0, 100.0)
    after = backdoor.measure(res.encoder)
    assert after["asr"] < 0.3, (before, after)
    assert after["acc"] > 0.95, (before, after)
    assert after["drift"] < 0.35, (before, after)


# --------------------------------------------------------------------------- the caller's objects
def test_caller_module_untouched_and_copy_returned() -> None:
    enc = _encoder()
    enc.body[0].weight.requires_grad_(False)  # a frozen layer stays frozen and untrained
    enc.body[1].eval()  # mixed flags
    enc.body[7].weight.grad = torch.ones_like(enc.body[7].weight)
    snap = copy.deepcopy(enc.state_dict())
    flags = [m.training for m in enc.modules()]
    req = [p.requires_grad for p in enc.parameters()]
    data = _images(32)
    out = purify(enc, data, **{**FAST, "augmentation": "crop_flip"})
    assert torch.equal(data, _images(32)), "the caller's data was modified"
    assert all(torch.equal(v, snap[k]) for k, v in enc.state_dict().items())
    assert [m.training for m in enc.modules()] == flags
    assert [p.requires_grad for p in enc.parameters()] == req
    assert torch.equal(enc.body[7].weight.grad, torch.ones_like(enc.body[7].weight))
    assert out is not enc and type(out) is SmallEncoder
    assert [m.training for m in out.modules()] == flags
    assert [p.requires_grad for p in out.parameters()] == req
    assert all(p.grad is None for p in out.parameters())
    assert not torch.equal(out.body[7].weight, enc.body[7].weight)  # trained
    assert torch.equal(out.body[0].weight, enc.body[0].weight)  # frozen by the caller


def test_inplace_modifies_the_callers_module() -> None:
    enc = _encoder()
    before = copy.deepcopy(enc)
    out = purify(enc, _images(32), inplace=True, **FAST)
    assert out is enc
    assert not _same_weights(enc, before)
    assert [m.training for m in enc.modules()] == [m.training for m in before.modules()]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("bn_policy", ["eval", "frozen"])
def test_torchscript_encoder_matches_eager(bn_policy: str) -> None:
    enc = _encoder()
    enc.body[6].p = 0.0  # dropout draws differ between TorchScript and eager
    scripted = torch.jit.script(copy.deepcopy(enc))
    kw = {**FAST, "bn_policy": bn_policy}
    out_s, out_e = purify(scripted, _images(16), **kw), purify(enc, _images(16), **kw)
    assert isinstance(out_s, torch.jit.ScriptModule) and out_s is not scripted
    assert all(p.is_leaf and p.requires_grad and p.grad is None for p in out_s.parameters())
    assert _same_weights(out_s, out_e)


# --------------------------------------------------------------------------- data forms
class DictDataset(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": i % 3}


def test_tensor_and_dataset_forms_give_the_same_result() -> None:
    x = _images(24)
    ref = purify(_encoder(), x, **FAST)
    for data in (TensorDataset(x, torch.zeros(24)), DictDataset(x), [img for img in x]):
        out = purify(_encoder(), data, **FAST)
        assert _same_weights(out, ref), type(data).__name__


def test_uint8_data_is_scaled() -> None:
    u8 = (_images(24) * 255).round().to(torch.uint8)
    a = purify(_encoder(), u8, **FAST)
    b = purify(_encoder(), u8.float() / 255, **FAST)
    assert _same_weights(a, b)


def test_dataloader_with_labels() -> None:
    x = _images(24)
    loader = DataLoader(TensorDataset(x, torch.arange(24)), batch_size=8, shuffle=False)
    r = Purifier(**FAST).fit(_encoder(), loader)
    assert r.history[0]["images"] == 24 and r.history[0]["batches"] == 3
    dict_loader = DataLoader(DictDataset(x), batch_size=8)
    assert Purifier(**FAST).fit(_encoder(), dict_loader).history[0]["images"] == 24


def test_last_single_image_batch_is_dropped_and_counted() -> None:
    r = Purifier(**FAST).fit(_encoder(), _images(17))
    assert r.history[0]["dropped_batches"] == 1 and r.history[0]["images"] == 16


# --------------------------------------------------------------------------- reproducibility
def test_two_runs_with_one_seed_are_identical_and_seeds_differ() -> None:
    x = _images(32)
    kw = dict(FAST, epochs=2, augmentation="crop_flip")
    a, b = purify(_encoder(), x, **kw), purify(_encoder(), x, **kw)
    assert _same_weights(a, b)
    assert not _same_weights(a, purify(_encoder(), x, seed=1, **kw))


def test_callers_rng_state_is_restored() -> None:
    enc, x = _encoder(), _images(16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    purify(enc, x, **FAST)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "terms",
    [
        {},  # the DEFAULT adversary and clean term (stateful: scanned patches, a persistent warp field)
        {"clean_term": "feature_consistency", "adversary": "pgd"},
        {"clean_term": "contrastive_views", "adversary": "pgd_patch"},
        {"free_replays": 2},  # the search's state refined by the fine-tune's backward; lr per batch
    ],
    ids=["defaults", "feature_consistency-pgd", "contrastive_views-pgd_patch", "free_replays"],
)
def test_resume_equals_uninterrupted_run(tmp_path, terms: dict) -> None:
    x = _images(24)
    kw = dict(FAST, epochs=3, optimizer="adam", lr=1e-3, **terms)
    full = Purifier(**kw).fit(_encoder(), x)
    d = tmp_path / "ck"
    # A run "stopped after epoch 1": keep only its epoch-1 checkpoint.
    Purifier(**kw, checkpoint_dir=str(d), keep_checkpoints=3).fit(_encoder(), x)
    for e, p in ckpt.list_checkpoints(d):
        if e != 1:
            p.unlink()
    resumed = Purifier(**kw, checkpoint_dir=str(d), resume=True).fit(_encoder(), x)
    assert _same_weights(resumed.encoder, full.encoder)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert len(resumed.history) == 3


def test_stateful_adversary_state_is_checkpointed(tmp_path) -> None:
    from cbd_fast.core.adversaries import make_adversary

    cfg = PurifyConfig(**FAST, checkpoint_dir=str(tmp_path))
    assert cfg.adversary == "trigger_search"  # the default is a stateful one
    Purifier(cfg).fit(_encoder(), _images(16))
    (path,) = [p for _, p in ckpt.list_checkpoints(tmp_path)]
    state = ckpt.load_checkpoint(path)["adversary"]
    assert state["calls"] == 2 and state["scan_scores"]
    assert sorted(state["params"]) == ["additive", "mask", "tone", "warp"]
    assert [t.shape[-1] for t in state["params"]["warp"][0]] == [2, 4, 8]  # the warp pyramid
    assert set(state["strength"]) == {"pgd", "mask", "warp", "tone", "additive", "sparse"}
    adv = make_adversary(cfg)
    adv.load_state_dict(state)
    again = adv.state_dict()
    assert again.keys() == state.keys() and again["scan_scores"] == state["scan_scores"]
    assert again["strength"] == state["strength"]
    for fam, sets in state["params"].items():
        for ps, qs in zip(sets, again["params"][fam]):
            assert all(torch.equal(p, q) for p, q in zip(ps, qs)), fam
    stateless = make_adversary(cfg.replace(adversary="pgd"))
    assert stateless.state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        stateless.load_state_dict(state)


def test_resume_of_a_finished_run_returns_its_weights(tmp_path) -> None:
    x = _images(16)
    done = purify(_encoder(), x, checkpoint_dir=str(tmp_path), **FAST)
    again = purify(_encoder(), x, checkpoint_dir=str(tmp_path), resume=True, **FAST)
    assert _same_weights(done, again)


# --------------------------------------------------------------------------- feature_fn, history, step
def test_feature_fn_with_a_classifier() -> None:
    torch.manual_seed(0)
    clf = Classifier()
    snap = copy.deepcopy(clf.state_dict())
    out = purify(clf, _images(24), feature_fn=lambda m, x: m.features(x), **FAST)
    assert type(out) is Classifier and out is not clf
    assert all(torch.equal(v, snap[k]) for k, v in clf.state_dict().items())
    assert not torch.equal(out.backbone.body[7].weight, clf.backbone.body[7].weight)
    assert torch.equal(out.head.weight, clf.head.weight)  # no gradient reaches the head
    assert out(_images(2)).shape == (2, 4)


def test_history_and_result_fields() -> None:
    r = Purifier(**{**FAST, "epochs": 2, "log_every": 1, "lr_schedule": "cosine"}).fit(
        _encoder(), _images(24)
    )
    assert isinstance(r, PurifyResult) and r.config.epochs == 2
    assert [h["epoch"] for h in r.history] == [1, 2]
    keys = {
        "loss",
        "loss_pull",
        "loss_clean",
        "attack_loss",
        "lr",
        "images",
        "batches",
        "skipped_batches",
        "dropped_batches",
        "seconds",
        "images_per_s",
    }
    for h in r.history:
        assert keys <= set(h)
        assert all(math.isfinite(h[k]) for k in keys)
        weight = r.runtime["clean_weight"]
        assert h["loss"] == pytest.approx(h["loss_pull"] + weight * h["loss_clean"], rel=1e-5)
    assert r.history[1]["lr"] < r.history[0]["lr"]  # cosine schedule


def test_prepare_and_step_return_device_scalars() -> None:
    p = Purifier(**FAST)
    model = p.prepare(_encoder())
    out = p.step(_images(8))
    assert {"loss", "loss_pull", "loss_clean", "attack_loss", "finite", "skipped"} <= set(out)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in out.values())
    assert isinstance(model, SmallEncoder)
    with pytest.raises(RuntimeError, match="prepare"):
        Purifier(**FAST).step(_images(8))


@pytest.mark.parametrize("bn_policy", ["train", "eval", "frozen"])
def test_bn_policies(bn_policy: str) -> None:
    enc = _encoder()
    out = purify(enc, _images(16), bn_policy=bn_policy, **FAST)
    bn_new, bn_old = out.body[1], enc.body[1]
    stats_changed = not torch.equal(bn_new.running_mean, bn_old.running_mean)
    affine_changed = not torch.equal(bn_new.weight, bn_old.weight)
    assert stats_changed == (bn_policy == "train")
    assert affine_changed == (bn_policy != "frozen")


# --------------------------------------------------------------------------- bad input
class TupleEncoder(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(100, 4)
        self.kind = kind

    def forward(self, x: torch.Tensor):
        z = self.lin(x.flatten(1))
        if self.kind == "tuple":
            return z, z
        if self.kind == "dict":
            return {"features": z}
        return z * float("nan")


class Boom(nn.Module):
    """Fails the test if purify does any work after a bad input should have been caught."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(100, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("work was done before the bad input was reported")


@pytest.mark.parametrize(
    ("data", "kw", "exc", "pattern"),
    [
        (_images(8) * 3, {}, ValueError, r"\[0, 1\].*max"),
        (_images(8) - 1, {}, ValueError, r"\[0, 1\].*min"),
        (_images(8).squeeze(1), {}, ValueError, r"4-D.*\(8, 10, 10\)"),
        (_images(1), {}, ValueError, "at least 2 images"),
        (_images(8)[:0], {}, ValueError, "non-empty"),
        (torch.full((8, 1, 10, 10), float("nan")), {}, ValueError, "NaN"),
        (torch.zeros(8, 1, 10, 10, dtype=torch.int32), {}, TypeError, "int32"),
        ("folder/", {}, TypeError, "Tensor.*Dataset.*DataLoader"),
        (_images(8), {"batch_size": 1}, ValueError, "batch_size must be >= 2; got 1"),
        (_images(8), {"epsilon": -0.1}, ValueError, "epsilon must be >= 0; got -0.1"),
        (_images(8), {"steps": -1}, ValueError, "steps must be >= 0; got -1"),
        (_images(8), {"temperature": 0.0}, ValueError, "temperature must be > 0; got 0.0"),
        (_images(8), {"epochs": 0}, ValueError, "epochs must be >= 1; got 0"),
        (_images(8), {"no_such_field": 1}, TypeError, "no_such_field.*valid fields: epsilon"),
        (_images(8), {"backend": "cuda"}, RuntimeError, "cuda"),
        (_images(8), {"device": "cuda:0"}, ValueError, "CUDA is not available"),
        (_images(8), {"device": "gpu0"}, ValueError, "gpu0"),
    ],
)
def test_bad_inputs_raise_before_any_work(data: object, kw: dict, exc: type, pattern: str) -> None:
    if "cuda" in str(kw.get("device", "")) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if kw.get("backend") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(exc, match=pattern):
        purify(Boom(), data, **{**FAST, **kw})


@pytest.mark.parametrize(
    ("encoder", "exc", "pattern"),
    [
        (TupleEncoder("tuple"), TypeError, "got a tuple.*feature_fn"),
        (TupleEncoder("dict"), TypeError, "got a dict"),
        (TupleEncoder("nan"), ValueError, "non-finite features"),
        ("resnet18", TypeError, "torch.nn.Module; got str"),
        (nn.ReLU(), ValueError, "no floating-point parameters"),
    ],
)
def test_bad_encoders(encoder: object, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        purify(encoder, _images(8), **FAST)  # type: ignore[arg-type]


def test_bad_config_object_and_feature_fn() -> None:
    with pytest.raises(TypeError, match="config must be"):
        purify(_encoder(), _images(8), config="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="feature_fn must be callable"):
        purify(_encoder(), _images(8), feature_fn="features", **FAST)  # type: ignore[arg-type]
    assert purify(_encoder(), _images(8), config={"epochs": 1, "batch_size": 4, "progress": False})


class NaNAfter(SmallEncoder):
    """Returns NaN features in training mode after ``limit`` fine-tune forwards."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.calls = limit, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.limit:
                return z * float("nan")
        return z


def test_nan_mid_run_stops_with_last_good_checkpoint(tmp_path) -> None:
    # 3 batches per epoch: epoch 1 is fine, the 2nd batch of epoch 2 goes NaN.
    torch.manual_seed(0)
    enc = NaNAfter(limit=4)
    with pytest.raises(
        RuntimeError, match=r"non-finite loss at epoch 2/3, batch 2/3.*purify-epoch0001\.ckpt"
    ):
        purify(enc, _images(24), checkpoint_dir=str(tmp_path), **{**FAST, "epochs": 3})
    (only,) = ckpt.list_checkpoints(tmp_path)
    state = ckpt.load_checkpoint(only[1])
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_batches_can_be_skipped() -> None:
    torch.manual_seed(0)
    r = Purifier(**{**FAST, "epochs": 2, "nonfinite": "skip"}).fit(NaNAfter(limit=4), _images(24))
    assert [h["skipped_batches"] for h in r.history] == [0, 2]
    assert all(torch.isfinite(p).all() for p in r.encoder.parameters())


def test_public_names() -> None:
    assert cbd_fast.purify is purify and callable(cbd_fast.purify)
    assert cbd_fast.Purifier is Purifier and cbd_fast.PurifyConfig is PurifyConfig
