"""``free_replays``: "free" adversarial training in the contrastive setting.

What is checked: a batch costs exactly m fine-tune forwards of ``[x_adv; x]`` (no separate attack
or anchor passes) and m optimiser steps; the adversary's state really climbs the loss from
the fine-tune's backward (later replays face a stronger attack); the cosine lr is annealed per
batch; bad values and adversaries that cannot take their step from the fine-tune name the value.
Resume and two-process equivalence are in ``test_purify.py`` and ``test_distributed.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from cbd_fast import Purifier, PurifyConfig
from tests.core.test_fewer_passes import _encoder, _images

pytestmark = pytest.mark.usefixtures("one_thread")

#: the search without its mask family (whose first-batch scan adds forwards of its own)
NO_SCAN = {"mask_weight": 0.0}
FAST = dict(epochs=2, batch_size=16, progress=False, health="off", adversary_options=NO_SCAN)


def _fit_recording(cfg: dict, x: torch.Tensor) -> tuple[Purifier, dict]:
    """Fit, counting the images each forward of the working model sees and the lr of every
    optimiser step."""
    import cbd_fast.core.purify as purify_module

    seen = {"images": 0, "lrs": []}
    real = purify_module.prepare_run

    def counting_prepare(*args, **kw):
        run = real(*args, **kw)
        run.model.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("images", seen["images"] + a[0].shape[0])
        )
        run.optimizer.register_step_pre_hook(lambda opt, a, k: seen["lrs"].append(opt.param_groups[0]["lr"]))
        return run

    purifier = Purifier(**cfg)
    purify_module.prepare_run = counting_prepare
    try:
        purifier.fit(_encoder(), x)
    finally:
        purify_module.prepare_run = real
    return purifier, seen


@pytest.mark.parametrize("m", [1, 3])
def test_a_batch_costs_m_finetune_passes(m: int) -> None:
    n, b, epochs = 64, 16, 2
    _, seen = _fit_recording(dict(FAST, free_replays=m, lr_schedule="constant"), _images(n))
    batches = epochs * n // b
    probe = 8  # the first-batch feature check before training
    # no anchor forward: each replay's forward of [x_adv; x] gives them
    assert seen["images"] == probe + batches * m * 2 * b
    assert len(seen["lrs"]) == batches * m


def test_the_cosine_lr_is_annealed_per_batch() -> None:
    n, b, epochs, m, lr = 64, 16, 2, 2, 1e-3
    _, seen = _fit_recording(dict(FAST, free_replays=m, lr=lr), _images(n))
    nb = n // b
    expected = [
        lr * 0.5 * (1 + math.cos(math.pi * (e + j / nb) / epochs))
        for e in range(epochs)
        for j in range(nb)
        for _ in range(m)
    ]
    assert seen["lrs"] == pytest.approx(expected, rel=1e-12)


def test_the_search_climbs_the_finetune_loss_across_replays() -> None:
    """With the weights barely moving, each replay's ascent step (from the fine-tune's backward)
    makes the next replay's attack stronger: the mean attack loss over 4 replays clearly exceeds
    that of 1 replay from the same start, and does not when the ascent is switched off (which also
    stops the strength statistics, so the shares differ a little)."""
    from cbd_fast.core.adversaries.search import TriggerSearch

    x = _images(64)
    still = dict(FAST, epochs=1, lr=1e-9, lr_schedule="constant")
    one = Purifier(**still, free_replays=1).fit(_encoder(), x).history[0]["attack_loss"]
    four = Purifier(**still, free_replays=4).fit(_encoder(), x).history[0]["attack_loss"]
    assert four > one + 0.05, (one, four)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TriggerSearch, "ascend", lambda self, st, leaves, grads, z: None)
        frozen = Purifier(**still, free_replays=4).fit(_encoder(), x).history[0]["attack_loss"]
    assert abs(frozen - one) < 0.05 and four > frozen + 0.05, (one, four, frozen)


def test_bad_values_name_the_value() -> None:
    for value, error, text in [
        (0, ValueError, "free_replays must be >= 1; got 0"),
        (65, ValueError, "free_replays must be None or in [1, 64]; got 65"),
        (True, TypeError, "free_replays must be an integer; got True"),
        (2.5, TypeError, "free_replays must be an integer; got 2.5"),
        ("2", TypeError, "free_replays must be an integer; got '2'"),
    ]:
        with pytest.raises(error) as info:
            PurifyConfig(free_replays=value).validate()
        assert text in str(info.value)
    with pytest.raises(
        ValueError, match=r"free_replays=2 needs adversary='trigger_search'.*got adversary='pgd'"
    ):
        PurifyConfig(free_replays=2, adversary="pgd").validate()
    assert PurifyConfig(free_replays=2.0).validate().free_replays == 2
