"""The label-free trigger search (``adversary="trigger_search"``) and its transforms."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cbd_fast import PurifyConfig
from cbd_fast.core.adversaries import AttackInputs, TriggerSearch
from cbd_fast.core.adversaries.search import FAMILIES
from cbd_fast.core.adversaries.transforms import (
    additive,
    mask_blend,
    project_area,
    sparse_step,
    tone_map,
    upsample,
    warp_images,
)
from cbd_fast.ops.nt_xent import nt_xent as cbd_nt_xent


def _encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16)
    ).eval()


class PatchDetector(nn.Module):
    """Features that jump when a bright ``k x k`` square sits at (row, col): a planted patch backdoor."""

    def __init__(self, row: int, col: int, k: int) -> None:
        super().__init__()
        self.base = _encoder(1)
        self.r, self.c, self.k = row, col, k
        self.target = nn.Parameter(torch.randn(16) * 5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, self.r : self.r + self.k, self.c : self.c + self.k].mean(dim=(1, 2, 3))
        gate = torch.sigmoid((region - 0.9) * 40)[:, None]
        return self.base(x) + gate * self.target


def _inputs(
    enc: nn.Module, x: torch.Tensor, cfg: PurifyConfig, indices: torch.Tensor | None = None
) -> AttackInputs:
    with torch.no_grad():
        anchors = enc(x).flatten(1).float()
    idx = torch.arange(x.shape[0]) if indices is None else indices
    return AttackInputs(enc, x, anchors, idx, 0, None, cfg)


def _cfg(**options: float) -> PurifyConfig:
    return PurifyConfig(adversary="trigger_search", adversary_options=options or None, seed=3).validate()


# ---- transforms ------------------------------------------------------------------------------------


def test_project_area_meets_the_budget_and_is_the_clamp_form() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.rand(1, 1, 10, 10, generator=g) * 1.5 - 0.2
    out = project_area(m, 7.0)
    assert float(out.sum()) <= 7.0 + 1e-4
    assert float(out.sum()) >= 7.0 - 1e-3  # the budget binds: not over-shrunk
    assert out.min() >= 0 and out.max() <= 1
    theta = (m.clamp(0, 1) - out)[out > 0]  # clamp(m - theta): one theta for every kept entry
    assert float(theta.max() - theta.min()) < 1e-4
    small = torch.full((1, 1, 4, 4), 0.1)
    assert torch.equal(project_area(small, 5.0), small)  # already inside: unchanged


def test_identity_transforms() -> None:
    x = torch.rand(3, 2, 9, 7)
    assert torch.allclose(warp_images(x, torch.zeros(1, 2, 9, 7)), x, atol=1e-6)
    assert torch.equal(tone_map(x, torch.zeros(2, 5)), x)
    assert torch.equal(mask_blend(x, torch.zeros(1, 1, 9, 7), torch.rand(1, 2, 9, 7)), x)
    assert torch.equal(additive(x, torch.zeros(1, 2, 3, 3), 0.1), x)


def test_transforms_respect_their_bounds_and_pass_gradients() -> None:
    x = torch.rand(2, 1, 12, 12)
    field = (torch.rand(1, 1, 4, 4) * 2 - 1).requires_grad_(True)
    y = additive(x, field * 10, 0.05)
    assert float((y - x).detach().abs().max()) <= 0.05 + 1e-6
    y.sum().backward()
    assert field.grad is not None and field.grad.abs().sum() > 0
    off = torch.full((1, 4), 0.2, requires_grad=True)
    z = tone_map(x, off)
    assert torch.allclose(z, (x + 0.2).clamp(0, 1))
    z.sum().backward()
    assert off.grad is not None and off.grad.abs().sum() > 0
    up = upsample(torch.ones(1, 2, 2, 2), 5, 6)
    assert up.shape == (1, 2, 5, 6) and torch.allclose(up, torch.ones_like(up))


# ---- options -------------------------------------------------------------------------------------------


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="every family weight is 0"):
        _cfg(**{f"{f}_weight": 0.0 for f in FAMILIES})
    with pytest.raises(ValueError, match="min_share"):
        _cfg(min_share=0.5)
    with pytest.raises(ValueError, match="mask_size"):
        _cfg(mask_size=3)
    with pytest.raises(ValueError, match="warp_bound"):
        _cfg(warp_bound=-1.0)
    assert TriggerSearch.check_options({"restarts": 3})["restarts"] == 3


# ---- the attack ---------------------------------------------------------------------------------------


def test_output_contract_and_determinism() -> None:
    enc, x = _encoder(), torch.rand(40, 1, 16, 16)
    keep = x.clone()
    cfg = _cfg()
    a = TriggerSearch(cfg)(_inputs(enc, x, cfg))
    b = TriggerSearch(cfg)(_inputs(enc, x, cfg))
    assert torch.equal(x, keep)  # the input is not modified
    assert a.shape == x.shape and a.dtype == x.dtype and not a.requires_grad
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - x).abs().amax(dim=(1, 2, 3)).min() > 0  # every image is attacked


def test_assignment_depends_on_the_sample_not_the_batch() -> None:
    enc, x = _encoder(), torch.rand(64, 1, 8, 8)
    cfg = _cfg()
    adv = TriggerSearch(cfg)
    fam = adv.active_families(x)
    full = adv._assign(_inputs(enc, x, cfg), fam)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:20]
    part = adv._assign(_inputs(enc, x[perm], cfg, indices=perm), fam)
    assert torch.equal(part, full[perm])
    counts = torch.bincount(full, minlength=len(fam))
    assert (counts > 0).all()  # every family gets images at equal shares


def test_shares_follow_the_measured_strength_with_floors() -> None:
    adv = TriggerSearch(_cfg(min_share=0.1))
    adv._strength = {f: 0.0 for f in FAMILIES} | {"pgd": 1.0, "mask": 3.0}
    sh = adv.shares(list(FAMILIES))
    free = 1.0 - 0.1 * len(FAMILIES)
    assert sh["warp"] == pytest.approx(0.1, abs=1e-3)
    assert sh["mask"] == pytest.approx(0.1 + free * 0.75, abs=1e-3)
    assert sh["pgd"] == pytest.approx(0.1 + free * 0.25, abs=1e-3)
    assert sum(sh.values()) == pytest.approx(1.0, abs=5e-3)
    off = TriggerSearch(_cfg(tone_weight=0.0))
    assert "tone" not in off.active_families(torch.rand(2, 1, 4, 4))


def test_scan_finds_a_planted_patch_of_any_size_and_place() -> None:
    for row, col, k in ((20, 3, 3), (2, 15, 5)):
        enc = PatchDetector(row, col, k).eval()
        x = torch.rand(32, 1, 28, 28) * 0.6
        cfg = _cfg()
        adv = TriggerSearch(cfg)
        out = adv(_inputs(enc, x, cfg))
        assert out.shape == x.shape
        score, r, c, side, kind = adv.scan_scores[0]
        assert kind in ("white", "random", "ascent")
        assert r < row + k and row < r + side and c < col + k and col < c + side, adv.scan_scores[:3]
        mask = adv._params["mask"][0][0]
        # the first mask covers the planted trigger (the rest of its area budget may lie elsewhere)
        assert mask[..., row : row + k, col : col + k].mean() > 0.6, mask[..., row : row + k, col : col + k]


def test_scan_areas_is_a_geometric_ladder_between_a_quarter_and_the_whole() -> None:
    from cbd_fast.core.adversaries.search import _scan_areas

    area = 0.04 * 28 * 28
    assert _scan_areas(area, 2) == [area / 4, area]  # the two areas of the defaults before 4.28
    assert _scan_areas(area, 1) == [area]
    three = _scan_areas(area, 3)
    assert three[0] == area / 4 and three[-1] == area and abs(three[1] - area / 2) < 1e-9
    # the sides a 28 x 28 image is scanned with: 3 and 6, and 4 in between with three areas
    assert sorted({round(a**0.5) for a in three}) == [3, 4, 6]
    assert TriggerSearch.check_options(None)["scan_areas"] == 3  # the default (method.md 4.28)
    with pytest.raises(ValueError, match="scan_areas"):
        _cfg(scan_areas=0)


class PatternDetector(nn.Module):
    """Features that jump when one particular +-pattern sits at (row, col): an optimised trigger.

    The gate reads ``mean((x - 0.5) * template)`` over the square, ``template`` a balanced +-1
    pattern: black, white, mid-grey and (almost every) random binary fill read 0 there, as clean
    images do; only a fill close to ``(template + 1) / 2`` opens the gate.
    """

    def __init__(self, row: int, col: int, k: int) -> None:
        super().__init__()
        self.base = _encoder(1)
        self.r, self.c, self.k = row, col, k
        t = torch.ones(k * k)
        t[torch.randperm(k * k, generator=torch.Generator().manual_seed(4))[: k * k // 2]] = -1.0
        self.register_buffer("template", t.view(1, 1, k, k))
        self.target = nn.Parameter(torch.randn(16, generator=torch.Generator().manual_seed(5)) * 5)
        self.target.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, self.r : self.r + self.k, self.c : self.c + self.k]
        m = ((region - 0.5) * self.template).mean(dim=(1, 2, 3))
        return self.base(x) + torch.sigmoid((m - 0.2) * 10)[:, None] * self.target


@pytest.mark.parametrize("row, col, k", [(12, 22, 4), (3, 6, 5)])
def test_scan_ascent_finds_an_optimised_pattern_that_fixed_fills_miss(row, col, k) -> None:
    enc = PatternDetector(row, col, k).eval()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(6)) * 0.6
    tops = {}
    for steps in (0, 3):
        cfg = _cfg(scan_ascent=steps)
        adv = TriggerSearch(cfg)
        adv(_inputs(enc, x, cfg))
        tops[steps] = adv.scan_scores[0]
    score, r, c, side, kind = tops[3]
    assert kind == "ascent" and r < row + k and row < r + side and c < col + k and col < c + side, tops
    assert tops[0][0] < score / 3, tops  # no fixed fill opens the gate
    # the raised pattern is the detector's template where the square covers it
    mask, pattern = adv._params["mask"][0][:2]
    inside = mask[0, 0, row : row + k, col : col + k] > 0.5
    want = (enc.template[0, 0] > 0).float()
    assert bool(inside.any()) and torch.equal(
        pattern[0, 0, row : row + k, col : col + k][inside].round(), want[inside]
    )


def test_scan_ascent_is_validated() -> None:
    for bad in (-1, 17, 1.5):
        with pytest.raises((ValueError, TypeError), match="scan_ascent"):
            _cfg(scan_ascent=bad)


def test_the_strongest_family_gets_more_of_the_batch() -> None:
    enc = PatchDetector(4, 4, 3).eval()  # 9 pixels: within the default 4% area budget (10.2)
    x = torch.rand(64, 1, 16, 16) * 0.3  # dark images: only a pasted pattern reaches the detector's 0.9
    cfg = _cfg(min_share=0.05)
    adv = TriggerSearch(cfg)
    for _ in range(6):
        adv(_inputs(enc, x, cfg))
    sh = adv.shares(adv.active_families(x))
    assert max(sh, key=sh.get) == "mask", sh


def test_non_image_inputs_use_per_sample_pgd_only() -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(10, 6)).eval()
    x = torch.rand(16, 10)
    cfg = _cfg()
    adv = TriggerSearch(cfg)
    assert adv.active_families(x) == ["pgd"]
    out = adv(_inputs(enc, x, cfg))
    assert float((out - x).abs().max()) <= cfg.epsilon + 1e-6


def test_state_dict_resumes_exactly() -> None:
    enc, x = _encoder(), torch.rand(24, 1, 12, 12)
    cfg = _cfg()
    full = TriggerSearch(cfg)
    outs = [full(_inputs(enc, x, cfg)) for _ in range(3)]
    first = TriggerSearch(cfg)
    for _ in range(2):
        first(_inputs(enc, x, cfg))
    resumed = TriggerSearch(cfg)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed(_inputs(enc, x, cfg)), outs[2])


def test_rescan_every_scans_the_current_encoder_again_at_its_epochs() -> None:
    enc, x = _encoder(), torch.rand(24, 1, 12, 12)

    def run(cfg: PurifyConfig, epochs: list[int], adv: TriggerSearch | None = None) -> tuple:
        adv = adv or TriggerSearch(cfg)
        scanned = []
        scan = adv._scan

        def counting(inp: AttackInputs) -> list:
            scanned.append(inp.epoch)
            return scan(inp)

        adv._scan = counting  # type: ignore[method-assign]
        for e in epochs:
            adv(dataclasses.replace(_inputs(enc, x, cfg), epoch=e))
        return adv, scanned

    epochs = [0, 0, 1, 1, 2, 2, 3, 4]
    assert run(_cfg(), epochs)[1] == [0]  # the default: one scan, at the start
    adv, scanned = run(_cfg(rescan_every=2), epochs)
    assert scanned == [0, 2, 4]  # the first batch of epochs 2 and 4 only
    # resuming after the epoch-2 scan does not scan epoch 2 again
    cfg = _cfg(rescan_every=2)
    first, _ = run(cfg, [0, 1, 2])
    resumed = TriggerSearch(cfg)
    resumed.load_state_dict(first.state_dict())
    assert run(cfg, [2, 3, 4], resumed)[1] == [4]
    with pytest.raises(ValueError, match="rescan_every"):
        _cfg(rescan_every=-1)


def test_mask_restarts_sets_the_number_of_masks_alone() -> None:
    enc, x = _encoder(), torch.rand(24, 1, 12, 12)
    cfg = _cfg(restarts=1, mask_restarts=3)
    adv = TriggerSearch(cfg)
    seen_masks, seen_warps = [], []
    for _ in range(4):
        adv(_inputs(enc, x, cfg))
        params = adv.state_dict()["params"]
        seen_masks.append([ps[0].clone() for ps in params["mask"]])
        seen_warps.append([[t.clone() for t in ps] for ps in params["warp"]])
    assert len(seen_masks[0]) == 3 and all(len(w) == 1 for w in seen_warps)
    # the masks are used (and refined) in turn: batch i changes mask i mod 3 only
    for i in (1, 2, 3):
        changed = [not torch.equal(a, b) for a, b in zip(seen_masks[i - 1], seen_masks[i])]
        assert changed == [j == i % 3 for j in range(3)], (i, changed)
    # the one warp set (a flow field per grid) is refined on every batch
    for i in (1, 2, 3):
        assert any(not torch.equal(a, b) for a, b in zip(seen_warps[i - 1][0], seen_warps[i][0])), i
    default = TriggerSearch(_cfg())
    default(_inputs(enc, x, default.config))
    assert len(default.state_dict()["params"]["mask"]) == default.options["restarts"]  # None: restarts
    with pytest.raises(ValueError, match="mask_restarts"):
        _cfg(mask_restarts=0)


def test_only_the_mask_family_changes_pixels_inside_the_mask() -> None:
    enc, x = _encoder(), torch.rand(16, 1, 12, 12)
    cfg = _cfg(**{f"{f}_weight": 0.0 for f in FAMILIES if f != "mask"}, min_share=0.0)
    adv = TriggerSearch(cfg)
    out = adv(_inputs(enc, x, cfg))
    mask = adv._params["mask"][0][0]
    changed = (out - x).abs().amax(dim=(0, 1))
    assert (changed[mask[0, 0] == 0] == 0).all()
    assert float(mask.sum()) <= 0.04 * 144 + 1e-4  # the default area budget


def test_sparse_step_keeps_the_largest_pixels_inside_the_box() -> None:
    x = torch.rand(3, 2, 6, 6)
    g = torch.randn(3, 2, 6, 6)
    g[:, :, 2, 3] = 50.0  # one position dominates: it must be kept, moved by the full step
    out = sparse_step(x, x.clone(), g, 0.5, pixels=4)
    changed = (out - x).abs().sum(1).flatten(1) > 0
    assert changed.sum(1).le(4).all() and changed[:, 2 * 6 + 3].all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.allclose(out[:, :, 2, 3], (x[:, :, 2, 3] + 0.5).clamp(max=1.0))
    # a budget of every pixel is plain normalised gradient ascent, clamped to the box
    full = sparse_step(x, x.clone(), g, 0.5, pixels=36)
    scale = g.flatten(1).abs().amax(1).view(3, 1, 1, 1)
    assert torch.allclose(full, (x + 0.5 * g / scale).clamp(0, 1), atol=1e-6)


def test_the_sparse_family_changes_few_pixels_by_a_lot() -> None:
    enc, x = PatchDetector(20, 3, 3), torch.rand(16, 1, 28, 28) * 0.6
    cfg = _cfg(**{f"{f}_weight": 0.0 for f in FAMILIES if f != "sparse"}, min_share=0.0)
    out = TriggerSearch(cfg)(_inputs(enc, x, cfg))
    changed = (out - x).abs().flatten(1)
    budget = round(0.08 * 28 * 28)
    assert bool(((changed > 0).sum(1) <= budget).all())
    assert float(changed.amax()) > 0.3, "no pixel moved beyond what per-sample PGD's eps allows"
    with torch.no_grad():
        shift = 1 - torch.nn.functional.cosine_similarity(enc(out), enc(x)).mean()
        pgd_like = (x + (torch.rand_like(x) * 2 - 1) * 40 / 255).clamp(0, 1)
        shift_noise = 1 - torch.nn.functional.cosine_similarity(enc(pgd_like), enc(x)).mean()
    assert float(shift) > float(shift_noise)


class _CountingEncoder(nn.Module):
    """``encoder`` that counts the images it is given (the scan's cost)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.images = encoder, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.encoder(x)


@pytest.mark.parametrize("ascent", [0, 3])
@pytest.mark.parametrize("planted", [(20, 3, 3), (2, 15, 5), None])
def test_halving_scan_chooses_what_the_full_scan_chooses_at_a_third_of_the_forwards(planted, ascent) -> None:
    """``scan_keep`` 0.25 against 1 (every square on every image): the same squares, scored the same,
    for a planted patch and for an encoder with none, with and without the own-pattern fills (raised
    on the same images either way); under a third of the scoring forwards."""
    enc = PatchDetector(*planted).eval() if planted else _encoder(2)
    x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(5)) * 0.6
    runs = {}
    for keep in (1.0, 0.25):
        counted = _CountingEncoder(enc)
        cfg = _cfg(scan_keep=keep, scan_ascent=ascent)
        adv = TriggerSearch(cfg)
        with torch.no_grad():
            anchors = enc(x).flatten(1).float()
        adv(AttackInputs(counted, x, anchors, torch.arange(128), 0, None, cfg))
        runs[keep] = (adv.scan_scores, [t.clone() for ps in adv._params["mask"] for t in ps], counted.images)
    (full, full_masks, full_n), (half, half_masks, half_n) = runs[1.0], runs[0.25]
    # the best squares: the same, in the same order, with the same scores (float32 forwards of other
    # batch compositions: equal to rounding); lower in the list a pruned square may be missing
    # (by place and side: an own-pattern fill raised to all white ties with the white fill, and
    # rounding may order the tie either way; the chosen masks and patterns must still be equal)
    assert [s[1:4] for s in half[:4]] == [s[1:4] for s in full[:4]]
    assert [s[0] for s in half[:4]] == pytest.approx([s[0] for s in full[:4]], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(half_masks, full_masks))
    if ascent == 0:  # 27 scan images here: rounds of 4, 8, 16, 27
        assert half_n * 3.5 <= full_n, (half_n, full_n)
    else:  # the own-pattern fills cost the same in both (their ~4 images); the scoring is cheaper
        assert half_n < full_n, (half_n, full_n)


def test_scan_rounds_follow_the_image_counts() -> None:
    from cbd_fast.core.adversaries.search import _scan_rounds

    assert _scan_rounds([1] * 32, 0.25) == [4, 8, 16, 32]  # 4, 8, 16, then all 32 images
    assert _scan_rounds([4, 4, 4, 4, 4, 4, 4, 4], 0.25) == [1, 2, 4, 8]
    assert _scan_rounds([0, 0, 9, 0, 0, 0, 0, 1], 0.25) == [3, 8]  # 9 images reach 4 and 8 at once
    assert _scan_rounds([1, 1, 1, 0, 0, 0, 0, 0], 0.25) == [8]  # fewer than 4: one round
    assert _scan_rounds([1] * 32, 1.0) == [32]  # the full scan


def test_scan_keep_is_validated() -> None:
    for bad in (0.0, 1.5, "x"):
        with pytest.raises((ValueError, TypeError), match="scan_keep"):
            _cfg(scan_keep=bad)


# ---- batch_steps: the whole batch for the first steps, the sparse rows alone for the rest ----------


def _sparse_rows(adv: TriggerSearch, inp: AttackInputs) -> torch.Tensor:
    fams = adv.active_families(inp.x)
    return (adv._assign(inp, fams) == fams.index("sparse")).nonzero().squeeze(1)


def test_batch_steps_forward_only_the_sparse_rows_after_the_shared_steps() -> None:
    """Default ``batch_steps`` 2 of ``steps`` 5: 2 forwards of the whole batch, then 3 of the sparse
    rows only (the mask family off so that no scan forwards are counted)."""
    enc, x = _encoder(), torch.rand(48, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for batch_steps, steps in ((2, 5), (0, 5), (7, 5), (1, 1), (2, 0)):
        cfg = PurifyConfig(
            adversary_options={"mask_weight": 0.0, "batch_steps": batch_steps}, steps=steps, seed=3
        ).validate()
        counted, adv = _CountingEncoder(enc), TriggerSearch(cfg)
        inp = _inputs(enc, x, cfg)
        n_sparse = _sparse_rows(adv, inp).numel()
        assert 0 < n_sparse < 48
        adv(AttackInputs(counted, x, inp.clean_features, inp.indices, 0, None, cfg))
        shared = min(steps, batch_steps or steps)
        assert counted.images == 48 * shared + n_sparse * (steps - shared), (batch_steps, steps)


def test_sparse_only_steps_are_whole_batch_steps_with_the_other_families_stopped() -> None:
    """After the shared steps, a sparse row's gradient is that of the whole-batch loss in which the
    other rows keep the features of the last shared forward: recomputed here with whole-batch
    forwards, the result is the same."""
    enc, x = _encoder(4), torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    cfg = PurifyConfig(adversary_options={"batch_steps": 2}, steps=4, seed=5).validate()
    fast = TriggerSearch(cfg)(_inputs(enc, x, cfg))

    ref = TriggerSearch(cfg)
    inp = _inputs(enc, x, cfg)
    rows = _sparse_rows(TriggerSearch(cfg), inp)
    assert 0 < rows.numel() < 40
    st = ref.begin(inp)
    z_last = None
    for k in range(4):
        x_adv, leaves = ref.compose(st, leaves=True)
        z = enc(x_adv).flatten(1).float()
        if k < 2:
            z_last = z.detach()
        else:  # the other rows: the features of the last shared forward
            keep = torch.ones(40, dtype=torch.bool)
            keep[rows] = False
            z = torch.where(keep[:, None], z_last, z)
        loss = cbd_nt_xent(z, inp.clean_features, cfg.temperature)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        if k < 2:
            ref.ascend(st, leaves, list(grads), z)
        else:  # the sparse rows' leaf is the second one (after the PGD rows')
            assert grads[1].shape[0] == rows.numel()
            with torch.no_grad():
                st.x_s = sparse_step(st.x_s0, st.x_s.detach(), grads[1], 1.0, st.sparse_pixels)
    slow, _ = ref.compose(st, leaves=False)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert not torch.equal(fast, TriggerSearch(cfg.replace(adversary_options={"batch_steps": 0}))(inp))


def test_batch_steps_is_validated() -> None:
    for bad in (-1, 1.5, "2"):
        with pytest.raises((ValueError, TypeError), match="batch_steps"):
            _cfg(batch_steps=bad)
    assert TriggerSearch.check_options({"batch_steps": 0})["batch_steps"] == 0


# ---- head_attack: the head's divergence in the search's objective ------------------------------------


def _head_kl(head: nn.Module, z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-row KL(h(z0) || h(z)) [n]."""
    p = head(z0).log_softmax(1)
    return (p.exp() * (p - head(z).log_softmax(1))).sum(1)


def test_head_attack_is_off_without_a_head_and_reads_it_with_one() -> None:
    """With no head the option changes nothing; with one, the objective holds
    ``head_attack * sum KL(h(anchors) || h(f(x'))) / B`` (checked against a direct computation) and
    the search moves the head's predictions further than without it."""
    enc, x = _encoder(), torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    head = nn.Linear(enc(x[:1]).flatten(1).shape[1], 10)
    torch.nn.init.normal_(head.weight, std=3.0, generator=torch.Generator().manual_seed(5))
    head.requires_grad_(False)
    inp0 = _inputs(enc, x, _cfg())
    outs = {}
    for w, with_head in ((0.0, False), (10.0, False), (0.0, True), (10.0, True)):
        cfg = _cfg(head_attack=w)
        inp = dataclasses.replace(inp0, config=cfg, head=head if with_head else None)
        outs[w, with_head] = TriggerSearch(cfg)(inp)
    assert torch.equal(outs[0.0, False], outs[10.0, False])  # no head: the option does nothing
    assert torch.equal(outs[0.0, False], outs[0.0, True])  # a head with head_attack 0: nothing either
    with torch.no_grad():
        kl = {
            w: float(_head_kl(head, inp0.clean_features, enc(outs[w, True]).flatten(1)).mean())
            for w in (0, 10)
        }
    assert kl[10] > 1.3 * kl[0], kl  # the head-guided search moves the predictions further

    # the term itself, against a direct computation (with a subset of rows, as the sparse steps use)
    adv = TriggerSearch(_cfg(head_attack=2.5))
    inp = dataclasses.replace(inp0, config=adv.config, head=head)
    st = adv.begin(inp)
    z = enc(x.flip(-1)).flatten(1)
    rows = torch.tensor([3, 7, 11])
    got = adv._head_divergence(st, z[rows], rows)
    want = 2.5 * _head_kl(head, inp0.clean_features[rows], z[rows]).sum() / 64
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(adv._head_divergence(st, z).detach()) > float(got.detach())


def test_head_attack_is_validated() -> None:
    for bad in (-1.0, 101.0, "x"):
        with pytest.raises((ValueError, TypeError), match="head_attack"):
            _cfg(head_attack=bad)
