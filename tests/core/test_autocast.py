"""Mixed precision (``PurifyConfig.amp_dtype``): bfloat16 autocast agrees with float32 within a
stated tolerance, on the features and on one CBD step's loss, and the automatic choice turns it on
only where it was measured to pay (CUDA), not on the CPU.

Tolerances (bfloat16 keeps 8 significant bits, a relative rounding of 2^-9 = 0.2% per operation):
features: cosine similarity >= 0.999 per image and relative L2 error <= 3%; one step's losses
(NT-Xent terms of magnitude ~1-5): relative difference <= 2%.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cbd_fast
from cbd_fast.core.features import batched_features
from cbd_fast.core.purify import cpu_has_native_bf16

FEATURE_COS_MIN = 0.999
FEATURE_REL_L2_MAX = 3e-2
LOSS_REL_MAX = 2e-2
STEP = dict(epochs=1, steps=2, batch_size=16, adversary="pgd", clean_term="anchor", progress=False, seed=0)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32),
    )  # fmt: skip


class TinyViT(nn.Module):
    """Patches -> 2 transformer layers -> the CLS token: attention and LayerNorm under autocast."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 32) * 0.02)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        return self.norm(self.encoder(t))[:, 0]


def _devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _features(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return batched_features(model, x).float()


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("make", [conv_net, TinyViT], ids=["conv", "vit"])
def test_bf16_features_agree_with_fp32(make, device):
    model = make().to(device).eval()
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    ref = _features(model, x, None)
    amp = _features(model, x, torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity(ref, amp, dim=1)
    rel = (ref - amp).norm() / ref.norm()
    assert cos.min() >= FEATURE_COS_MIN, float(cos.min())
    assert rel <= FEATURE_REL_L2_MAX, float(rel)
    assert not torch.equal(ref, amp)  # autocast really ran in bfloat16


def _one_step(make, device: str, amp: str) -> dict[str, float]:
    purifier = cbd_fast.Purifier(amp_dtype=amp, device=device, **STEP)
    purifier.prepare(make())
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(device)
    out = purifier.step(x, torch.arange(16, device=device))
    return {k: float(v) for k, v in out.items() if k.startswith(("loss", "attack"))}


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("make", [conv_net, TinyViT], ids=["conv", "vit"])
def test_one_step_loss_bf16_agrees_with_fp32(make, device):
    ref = _one_step(make, device, "float32")
    amp = _one_step(make, device, "bfloat16")
    for key in ("loss", "loss_pull", "attack_loss"):
        assert amp[key] == pytest.approx(ref[key], rel=LOSS_REL_MAX), (key, ref, amp)
    assert amp["loss_clean"] == pytest.approx(ref["loss_clean"], rel=0.2, abs=1e-3)  # a small difference term


def test_auto_is_off_on_the_cpu_and_bf16_runs_end_to_end():
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    res = cbd_fast.Purifier(**STEP).fit(conv_net(), x)
    assert res.config.amp_dtype == "auto" and res.runtime["amp_dtype"] == "float32"
    res = cbd_fast.Purifier(amp_dtype="bfloat16", **STEP).fit(conv_net(), x)
    assert res.runtime["amp_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in res.encoder.parameters())  # weights stay float32
    assert all(torch.isfinite(torch.tensor(res.history[0][k])) for k in ("loss", "health_knn"))


@pytest.mark.gpu
def test_auto_is_bf16_on_cuda():
    res = cbd_fast.Purifier(device="cuda", **STEP).fit(conv_net(), torch.rand(32, 3, 16, 16))
    assert res.runtime["amp_dtype"] == "bfloat16"


def test_native_bf16_probe_answers():
    assert isinstance(cpu_has_native_bf16(), bool)
