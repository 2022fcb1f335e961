"""The cheaper CBD step: attacking a share of each batch (``adv_fraction``), the original's anchors
(``attack_anchors="original"``) and the per-sample reference cache (``reference_cache``).

What is checked: the attacked rows depend only on (seed, epoch, index); the encoder sees exactly the
images the cost model counts (no per-batch reference forward once cached); the cache equals the
original's features; caching does not change the result; a batch with fewer than two attacked
images is a clean-only step; bad settings raise errors that name the value.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cbd_fast import Purifier, PurifyConfig, purify
from cbd_fast.core.reference_cache import ReferenceCache, build_reference_cache, cache_policy
from cbd_fast.core.step import adversarial_rows

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(epochs=1, batch_size=16, steps=2, progress=False, health="off")


def _encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 25, 12),
    )


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, 10, 10), generator=torch.Generator().manual_seed(seed))


class _Counter:
    """Counts the images every forward of a module sees (a forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.images = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.images += int(args[0].shape[0])


# ---------------------------------------------------------------------------------------------- rows
def test_adversarial_rows_are_a_per_image_coin() -> None:
    cfg = PurifyConfig(adv_fraction=0.3, seed=2).validate()
    idx = torch.arange(20000)
    rows = adversarial_rows(cfg, idx, epoch=0)
    assert rows is not None
    share = rows.numel() / idx.numel()
    assert abs(share - 0.3) < 0.02
    # the same images whatever the batch order or split: a function of (seed, epoch, index) only
    perm = torch.randperm(20000, generator=torch.Generator().manual_seed(0))
    again = perm[adversarial_rows(cfg, perm, epoch=0)]
    assert torch.equal(torch.sort(again).values, rows)
    halves = [h[adversarial_rows(cfg, h, epoch=0)] for h in (idx[:7000], idx[7000:])]
    assert torch.equal(torch.cat(halves), rows)
    # another epoch draws other images
    other = adversarial_rows(cfg, idx, epoch=1)
    assert not torch.equal(other, rows)
    assert adversarial_rows(PurifyConfig(adv_fraction=1.0).validate(), idx, epoch=0) is None


# ---------------------------------------------------------------------------------------------- cost
@pytest.mark.parametrize(
    "fraction, anchors, cache",
    [(1.0, "current", False), (1.0, "current", True), (0.5, "original", True), (0.25, "original", True)],
)
def test_encoder_sees_exactly_the_images_the_cost_model_counts(fraction, anchors, cache) -> None:
    """Per batch of B with m attacked and K steps: anchors (m, only with "current"), attack (K * m),
    fine-tune (m + B); the frozen original: B per batch without the cache, N once with it."""
    x = _images(64)
    k, b = 3, 16
    cfg = dict(FAST, epochs=2, batch_size=b, steps=k, adversary="pgd", adv_fraction=fraction)
    cfg.update(attack_anchors=anchors, reference_cache=cache)
    purifier = Purifier(**cfg)
    seen: dict[str, _Counter] = {}

    import cbd_fast.core.purify as purify_module

    real = purify_module.prepare_run

    def counting_prepare(*args, **kw):
        run = real(*args, **kw)
        seen["model"] = _Counter(run.model)
        seen["reference"] = _Counter(run.reference)
        return run

    purify_module.prepare_run = counting_prepare
    try:
        purifier.fit(_encoder(), x)
    finally:
        purify_module.prepare_run = real
    from cbd_fast.core.inputs import EpochShuffleSampler

    rows_per_batch = []
    for epoch in range(2):
        sampler = EpochShuffleSampler(64, 0)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for s in range(0, 64, b):
            r = adversarial_rows(purifier.config, order[s : s + b], epoch)
            m = b if r is None else r.numel()
            rows_per_batch.append(m if m >= 2 else 0)
    m_total = sum(rows_per_batch)
    probe = 8  # the first-batch feature check before training
    expected_model = probe + (m_total if anchors == "current" else 0) + k * m_total + (m_total + 2 * 64)
    assert seen["model"].images == expected_model
    # the reference: the N images of the cache once, or B per batch (N per epoch)
    assert seen["reference"].images == (64 if cache else 2 * 64)


# ---------------------------------------------------------------------------------------------- cache
def test_reference_cache_holds_the_originals_features() -> None:
    enc = _encoder().eval()
    x = _images(40)
    from cbd_fast.core import distributed as dist

    ctx = dist.init_context(PurifyConfig(device="cpu").validate())
    cache = build_reference_cache(
        enc,
        lambda ids: x[torch.tensor(ids)],
        list(range(3, 40)),
        40,
        8,
        torch.device("cpu"),
        ctx,
        lambda: torch.autocast("cpu", enabled=False),
    )
    idx = torch.tensor([5, 3, 39, 17])
    with torch.no_grad():
        want = enc(x[idx])
    torch.testing.assert_close(cache.lookup(idx), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(KeyError, match="without cached"):
        cache.lookup(torch.tensor([0]))
    with pytest.raises(KeyError, match="outside"):
        cache.lookup(torch.tensor([40]))


def test_caching_does_not_change_the_result() -> None:
    x = _images(48)
    cfg = dict(FAST, epochs=2, adv_fraction=0.5, attack_anchors="original")
    a = purify(_encoder(), x, **cfg, reference_cache=True).state_dict()
    b = purify(_encoder(), x, **cfg, reference_cache=False).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_cache_policy() -> None:
    cpu = torch.device("cpu")
    x = _images(8)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    auto = PurifyConfig().validate()
    assert cache_policy(auto, x, 8, 12, cpu) is True
    assert cache_policy(auto, loader, None, 12, cpu) is False
    assert cache_policy(auto.replace(augmentation="crop_flip"), x, 8, 12, cpu) is False
    assert cache_policy(auto, x, 10**9, 4096, cpu) is False  # 16 TB: not on this CPU
    assert cache_policy(auto.replace(reference_cache=False), x, 8, 12, cpu) is False
    forced = auto.replace(reference_cache=True)
    with pytest.raises(ValueError, match="DataLoader"):
        cache_policy(forced, loader, None, 12, cpu)
    with pytest.raises(ValueError, match="'crop_flip'"):
        cache_policy(forced.replace(augmentation="crop_flip"), x, 8, 12, cpu)
    with pytest.raises(ValueError, match="DataLoader"):
        purify(_encoder(), loader, **FAST, reference_cache=True)


# ---------------------------------------------------------------------------------------------- edges
def test_a_batch_with_fewer_than_two_attacked_images_is_a_clean_only_step() -> None:
    purifier = Purifier(**FAST, adv_fraction=1e-6, attack_anchors="original")
    model = purifier.prepare(_encoder())
    before = [p.detach().clone() for p in model.parameters()]
    out = purifier.step(_images(8))
    assert float(out["loss_pull"]) == 0.0 and float(out["attack_loss"]) == 0.0
    assert float(out["loss_clean"]) >= 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(before) == len(list(model.parameters()))


def test_original_anchors_without_a_clean_term_still_get_a_reference() -> None:
    x = _images(32)
    out = purify(_encoder(), x, **FAST, clean_term="none", attack_anchors="original", adv_fraction=0.5)
    assert isinstance(out, nn.Module)


@pytest.mark.parametrize(
    "field, value, error, text",
    [
        ("adv_fraction", 0.0, ValueError, "adv_fraction must be > 0; got 0.0"),
        ("adv_fraction", 1.5, ValueError, "adv_fraction must be in (0, 1]; got 1.5"),
        ("adv_fraction", "half", TypeError, "adv_fraction must be a real number; got 'half'"),
        ("attack_anchors", "frozen", ValueError, "attack_anchors"),
        ("reference_cache", "yes", ValueError, "reference_cache must be 'auto', True or False; got 'yes'"),
        ("reference_cache", 1, ValueError, "reference_cache must be 'auto', True or False; got 1"),
    ],
)
def test_bad_settings_name_the_value(field, value, error, text) -> None:
    with pytest.raises(error) as info:
        PurifyConfig(**{field: value}).validate()
    assert text in str(info.value)


def test_reference_cache_class_is_exported() -> None:
    assert ReferenceCache.__name__ == "ReferenceCache"


class _ViewEncoder(nn.Module):
    """A conv encoder whose forward calls ``.view`` on the conv output: refuses channels-last."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 10 * 10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


def test_channels_last_auto_on_the_cpu_for_conv_encoders_and_falls_back() -> None:
    x = _images(32)
    fit = Purifier(**FAST).fit(_encoder(), x)
    assert fit.runtime["channels_last"] is True  # a Conv2d encoder on the CPU
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(100, 8))
    assert Purifier(**FAST).fit(mlp, x).runtime["channels_last"] is False
    # .view on a channels-last tensor raises: the run goes on in the contiguous layout
    fit = Purifier(**FAST).fit(_ViewEncoder(), x)
    assert fit.runtime["channels_last"] is False
    with pytest.raises(RuntimeError, match="channels_last=True"):  # an explicit True is honoured
        Purifier(**FAST, channels_last=True).fit(_ViewEncoder(), x)
    out = fit.encoder
    assert all(p.is_contiguous() for p in out.parameters())
