"""cbd_fast.core.attack: contrastive PGD with input-only gradients, and attack_mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cbd_fast.core.attack import attack_mode, contrastive_pgd
from cbd_fast.ops import nt_xent

EPS, STEP, TAU = 16 / 255, 4 / 255, 0.5


def tiny_encoder(seed: int = 0) -> nn.Module:
    """A real small conv net with BatchNorm and dropout (features: [B, 32])."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(64, 32),
    )


@pytest.fixture
def setup():
    enc = tiny_encoder()
    # Give BatchNorm non-trivial running statistics, then leave the encoder in train mode.
    with torch.no_grad():
        for _ in range(3):
            enc(torch.rand(32, 1, 12, 12))
    enc.train()
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), attack_mode(enc):
        clean = enc(x)
    return enc, x, clean


def eval_loss(enc, x_adv, clean, tau=TAU):
    with torch.no_grad(), attack_mode(enc):
        return nt_xent(enc(x_adv), clean, tau).item()


def snapshot(enc):
    return (
        [m.training for m in enc.modules()],
        [p.requires_grad for p in enc.parameters()],
        {k: v.clone() for k, v in enc.state_dict().items()},
    )


def test_raises_contrastive_loss_over_random_start(setup):
    enc, x, clean = setup
    tau = 0.1  # a random-init net maps all images close together: a sharp tau shows the effect
    kw = dict(epsilon=EPS, step_size=STEP, temperature=tau)
    start = contrastive_pgd(enc, x, clean, steps=0, generator=torch.Generator().manual_seed(5), **kw)
    adv = contrastive_pgd(enc, x, clean, steps=10, generator=torch.Generator().manual_seed(5), **kw)
    l_clean, l_start, l_adv = (eval_loss(enc, z, clean, tau) for z in (x, start, adv))
    # Measured: 3.3568 (clean), 3.3564 (random start), 3.4084 (10 steps).
    assert l_adv > l_start + 0.02 and l_adv - l_start > 20 * abs(l_start - l_clean), (l_clean, l_start, l_adv)
    # Inside the ball and the box, a new detached tensor in x's dtype.
    assert (adv - x).abs().max() <= EPS * (1 + 1e-6)
    assert adv.min() >= 0 and adv.max() <= 1
    assert adv.dtype == x.dtype and not adv.requires_grad and adv.grad_fn is None


def test_restores_flags_and_touches_no_parameter(setup):
    enc, x, clean = setup
    enc[1].eval()  # a mix of flags, and a frozen layer
    enc[4].weight.requires_grad_(False)
    before = snapshot(enc)
    enc[0].weight.grad = torch.ones_like(enc[0].weight)  # an existing .grad is left alone
    contrastive_pgd(enc, x, clean, epsilon=EPS, step_size=STEP, steps=3, temperature=TAU)
    after = snapshot(enc)
    assert after[0] == before[0] and after[1] == before[1]
    for k, v in before[2].items():  # BatchNorm running statistics not updated (eval mode)
        assert torch.equal(v, after[2][k]), k
    assert torch.equal(enc[0].weight.grad, torch.ones_like(enc[0].weight))
    assert all(p.grad is None for n, p in enc.named_parameters() if n != "0.weight")


def test_restores_flags_after_exception(setup):
    enc, x, clean = setup
    before = snapshot(enc)

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, z):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom inside the encoder")
            return z * self.scale

    wrapped = nn.Sequential(enc, Boom()).train()
    wrapped[1].scale.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom inside the encoder"):
        contrastive_pgd(wrapped, x, clean, epsilon=EPS, step_size=STEP, steps=3, temperature=TAU)
    after = snapshot(enc)
    assert after[0] == before[0] and after[1] == before[1]
    assert wrapped.training and wrapped[1].training and not wrapped[1].scale.requires_grad
    assert all(p.grad is None for p in wrapped.parameters())


def test_attack_mode_nests_and_restores():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout()).train()
    net[1].eval()
    net[0].bias.requires_grad_(False)
    with attack_mode(net) as m:
        assert m is net and not any(mod.training for mod in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
        with attack_mode(net):
            pass
        assert not net.training
    assert net.training and not net[1].training and net[2].training
    assert net[0].weight.requires_grad and not net[0].bias.requires_grad
    with (
        pytest.raises(TypeError, match="encoder must be a torch.nn.Module; got function"),
        attack_mode(lambda z: z),
    ):
        pass


def test_start_points(setup):
    enc, x, clean = setup
    kw = dict(epsilon=EPS, step_size=STEP, temperature=TAU, steps=0)
    same = contrastive_pgd(enc, x, clean, random_start=False, **kw)
    assert torch.equal(same, x) and same is not x
    a = contrastive_pgd(enc, x, clean, generator=torch.Generator().manual_seed(3), **kw)
    b = contrastive_pgd(enc, x, clean, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b) and not torch.equal(a, x)
    # x_init overrides random_start and is projected on the ball and the box.
    init = x + 1.0
    c = contrastive_pgd(enc, x, clean, x_init=init, **kw)
    assert torch.equal(c, torch.clamp(torch.minimum(init, x + EPS), 0, 1))


def test_reproducible_and_x_untouched(setup):
    enc, x, clean = setup
    x_in = x.clone().requires_grad_(True)
    kw = dict(epsilon=EPS, step_size=STEP, steps=3, temperature=TAU)
    a = contrastive_pgd(enc, x_in, clean, generator=torch.Generator().manual_seed(9), **kw)
    b = contrastive_pgd(enc, x_in, clean, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(a, b)
    assert torch.equal(x_in.detach(), x) and x_in.grad is None


def test_channels_last_feature_fn_and_gather(setup):
    enc, x, clean = setup
    xcl = x.contiguous(memory_format=torch.channels_last)
    kw = dict(epsilon=EPS, step_size=STEP, steps=2, temperature=TAU)
    out = contrastive_pgd(enc, xcl, clean, random_start=False, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = contrastive_pgd(enc, x, clean, random_start=False, **kw)
    torch.testing.assert_close(out, ref, atol=STEP * 1.01, rtol=0)  # conv layouts may differ in rounding

    calls = []

    def feature_fn(e, z):
        calls.append(z.shape)
        return e(z)[:, :16].reshape(z.shape[0], 4, 4)  # any shape [B, ...]: flattened to [B, 16]

    with torch.no_grad(), attack_mode(enc):
        clean16 = enc(x)[:, :16]
    contrastive_pgd(enc, x, clean16, feature_fn=feature_fn, **kw)
    assert len(calls) == 2

    # gather: adversarial features joined with other ranks' rows; clean features are then global.
    others = torch.randn(8, 32)
    glob_clean = torch.cat([clean, torch.randn(8, 32)])
    adv = contrastive_pgd(enc, x, glob_clean, gather=lambda f: torch.cat([f, others]), **kw)
    assert adv.shape == x.shape
    with pytest.raises(ValueError, match="gathered features have batch 24 but clean_features has 16"):
        contrastive_pgd(enc, x, clean, gather=lambda f: torch.cat([f, others]), **kw)


def test_autocast_keeps_dtype(setup):
    enc, x, clean = setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = contrastive_pgd(enc, x, clean, epsilon=EPS, step_size=STEP, steps=2, temperature=TAU)
    assert adv.dtype == torch.float32 and (adv - x).abs().max() <= EPS * (1 + 1e-6)
    # Called under no_grad (e.g. from an evaluation loop): the attack enables grad itself.
    with torch.no_grad():
        adv2 = contrastive_pgd(
            enc, x, clean, epsilon=EPS, step_size=STEP, steps=2, temperature=TAU, random_start=False
        )
    assert not torch.equal(adv2, x)


def test_bfloat16_images(setup):
    enc, x, clean = setup
    enc = enc.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    adv = contrastive_pgd(
        enc, xb, clean.to(torch.bfloat16), epsilon=EPS, step_size=STEP, steps=2, temperature=TAU
    )
    assert adv.dtype == torch.bfloat16 and adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(steps=-1), ValueError, "steps must be an int >= 0; got -1"),
        (dict(steps=1.5), ValueError, "steps must be an int >= 0; got 1.5"),
        (dict(epsilon=-0.1), ValueError, "epsilon must be finite and >= 0; got -0.1"),
        (dict(step_size=math.inf), ValueError, "step_size must be finite and >= 0; got inf"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0; got 0.0"),
        (dict(epsilon="big"), TypeError, "epsilon must be a real number"),
        (dict(feature_fn=3), TypeError, "feature_fn must be callable"),
    ],
)
def test_bad_arguments(setup, kwargs, exc, match):
    enc, x, clean = setup
    kw = dict(epsilon=EPS, step_size=STEP, steps=1, temperature=TAU)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        contrastive_pgd(enc, x, clean, **kw)


def test_bad_tensors(setup):
    enc, x, clean = setup
    kw = dict(epsilon=EPS, step_size=STEP, steps=1, temperature=TAU)
    with pytest.raises(ValueError, match=r"clean_features must have x's batch size 16; got shape \(15, 32\)"):
        contrastive_pgd(enc, x, clean[:15], **kw)
    with pytest.raises(TypeError, match="x must be a float tensor; got torch.int64"):
        contrastive_pgd(enc, x.long(), clean, **kw)
    with pytest.raises(TypeError, match="encoder must be a torch.nn.Module"):
        contrastive_pgd(lambda z: z, x, clean, **kw)
    with pytest.raises(ValueError, match="x_init must match x"):
        contrastive_pgd(enc, x, clean, x_init=x[:2], **kw)

    class TupleOut(nn.Module):
        def forward(self, z):
            return z.flatten(1), z

    with pytest.raises(TypeError, match="pass feature_fn"):
        contrastive_pgd(TupleOut(), x, x.flatten(1), **kw)
