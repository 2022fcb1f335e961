"""The data layer: every accepted form, validation, order and per-sample randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cbd_fast.core.clean_terms import augment
from cbd_fast.core.inputs import EpochShuffleSampler, ImageStream, check_images, extract_images
from cbd_fast.core.rng import per_sample_uniform, random_start

CPU = torch.device("cpu")


class DictDataset(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"label": 3, "image": self.images[i]}


def _collect(stream: ImageStream, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xs, idx = zip(*stream.epoch(epoch))
    return torch.cat(xs), torch.cat(idx)


def test_extract_images_forms() -> None:
    t = torch.rand(1, 4, 4)
    assert extract_images(t) is t
    assert extract_images((t, 1)) is t
    assert extract_images([t, 1]) is t
    assert extract_images({"image": t, "label": 0}) is t
    assert torch.equal(extract_images(np.zeros((1, 2, 2), dtype=np.float32)), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="'image' key.*label"):
        extract_images({"img": t, "label": 0})
    with pytest.raises(TypeError, match="image tensor"):
        extract_images("not an image")
    with pytest.raises(ValueError, match="empty tuple"):
        extract_images(())


@pytest.mark.parametrize(
    ("x", "exc", "pattern"),
    [
        (torch.rand(2, 1, 4, 4) * 2, ValueError, r"\[0, 1\]; got min .*max"),
        (torch.rand(2, 1, 4, 4) - 0.5, ValueError, r"\[0, 1\]"),
        (torch.full((2, 1, 4, 4), float("nan")), ValueError, "NaN"),
        (torch.rand(2, 4, 4), ValueError, r"4-D.*\(2, 4, 4\)"),
        (torch.zeros(0, 1, 4, 4), ValueError, "non-empty"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.int64), TypeError, "torch.int64"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.complex64), TypeError, "complex64"),
        ([1, 2], TypeError, "torch.Tensor"),
    ],
)
def test_check_images_rejects(x: object, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        check_images(x)  # type: ignore[arg-type]


def test_tensor_stream_covers_each_image_once_with_indices() -> None:
    data = torch.rand(10, 1, 3, 3)
    s = ImageStream(data, batch_size=4, seed=0, device=CPU)
    assert s.batches_per_epoch() == 3
    x, idx = _collect(s)
    assert sorted(idx.tolist()) == list(range(10))
    assert torch.equal(x, data[idx])


def test_uint8_is_scaled() -> None:
    data = torch.randint(0, 256, (6, 3, 2, 2), dtype=torch.uint8)
    x, idx = _collect(ImageStream(data, batch_size=6, seed=0, device=CPU))
    assert x.dtype == torch.float32
    assert torch.allclose(x, data[idx].float() / 255)


def test_order_is_a_function_of_seed_and_epoch() -> None:
    data = torch.rand(16, 1, 2, 2)
    a = ImageStream(data, batch_size=4, seed=5, device=CPU)
    b = ImageStream(data, batch_size=4, seed=5, device=CPU)
    assert torch.equal(_collect(a, 2)[1], _collect(b, 2)[1])  # b never saw epochs 0, 1
    assert not torch.equal(_collect(a, 0)[1], _collect(a, 1)[1])
    s = EpochShuffleSampler(16, seed=5)
    s.set_epoch(3)
    assert list(s) == list(s)


def test_dataset_forms_and_labels_ignored() -> None:
    images = torch.rand(7, 1, 3, 3)
    for ds in (TensorDataset(images, torch.arange(7)), DictDataset(images)):
        x, idx = _collect(ImageStream(ds, batch_size=3, seed=0, device=CPU))
        assert torch.equal(x, images[idx])


def test_user_dataloader_is_used_as_is() -> None:
    images = torch.rand(9, 1, 3, 3)
    loader = DataLoader(TensorDataset(images, torch.zeros(9)), batch_size=4, shuffle=False)
    s = ImageStream(loader, batch_size=999, seed=0, device=CPU)
    x, idx = _collect(s)
    assert torch.equal(x, images) and idx.tolist() == list(range(9))  # positions in the stream
    dict_loader = DataLoader(DictDataset(images), batch_size=5)
    assert torch.equal(_collect(ImageStream(dict_loader, batch_size=2, seed=0, device=CPU))[0], images)


def test_user_loader_generator_state_round_trip() -> None:
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(torch.rand(8, 1, 2, 2), batch_size=4, shuffle=True, generator=g)
    s = ImageStream(loader, batch_size=4, seed=0, device=CPU)
    states = s.generator_states()
    assert states, "the loader's generator must be saved"
    first = _collect(s)[0]
    s.set_generator_states(states)
    assert torch.equal(_collect(s)[0], first)


@pytest.mark.parametrize(
    ("data", "exc", "pattern"),
    [
        (torch.rand(1, 1, 4, 4), ValueError, r"at least 2 images.*got 1"),
        (torch.rand(3, 1, 4, 4) + 1, ValueError, r"\[0, 1\]"),
        (TensorDataset(torch.rand(1, 1, 2, 2)), ValueError, "at least 2"),
        (TensorDataset(torch.rand(3, 1, 2, 2) * 3), ValueError, r"\[0, 1\]"),
        ("images/", TypeError, "Tensor.*Dataset.*DataLoader"),
        (42, TypeError, "int"),
    ],
)
def test_bad_data_raises_at_construction(data: object, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        ImageStream(data, batch_size=2, seed=0, device=CPU)


def test_bad_later_batch_is_reported_with_its_position() -> None:
    images = torch.rand(6, 1, 2, 2)
    images[5] = 2.0
    loader = DataLoader(images, batch_size=2)
    s = ImageStream(loader, batch_size=2, seed=0, device=CPU)
    s.first_batch()  # batch 0 is fine
    with pytest.raises(ValueError, match="batch 2 of epoch 1"):
        _collect(s)


def test_per_sample_uniform_ignores_batch_composition() -> None:
    idx = torch.tensor([3, 9, 1, 4])
    u = per_sample_uniform(idx, (2, 3, 3), seed=1, epoch=2)
    assert u.shape == (4, 2, 3, 3) and u.dtype == torch.float32
    assert float(u.min()) >= 0 and float(u.max()) < 1
    alone = per_sample_uniform(torch.tensor([9]), (2, 3, 3), seed=1, epoch=2)
    assert torch.equal(u[1:2], alone)
    assert not torch.equal(u, per_sample_uniform(idx, (2, 3, 3), seed=1, epoch=3))
    assert not torch.equal(u, per_sample_uniform(idx, (2, 3, 3), seed=2, epoch=2))
    assert not torch.equal(u, per_sample_uniform(idx, (2, 3, 3), seed=1, epoch=2, stream=1))
    big = per_sample_uniform(torch.arange(64), (1000,), seed=0, epoch=0)
    assert abs(float(big.mean()) - 0.5) < 0.01 and abs(float(big.std()) - 12**-0.5) < 0.01


def test_hashed_uniform_used_on_accelerators_is_uniform_and_chunk_independent() -> None:
    from cbd_fast.core.rng import _hashed_uniform

    key = torch.tensor([1, 2, 3, 4_000_000_000], dtype=torch.int64)
    u = _hashed_uniform(key, 5000)
    assert torch.equal(u, _hashed_uniform(key, 5000, chunk_elements=7000))  # chunking changes nothing
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12**-0.5) < 0.01
    assert float(torch.corrcoef(u[:3])[0, 1:].abs().max()) < 0.05


def test_random_start_stays_in_ball_and_box() -> None:
    x = torch.rand(8, 1, 4, 4)
    u = per_sample_uniform(torch.arange(8), (1, 4, 4), seed=0, epoch=0)
    y = random_start(x, u, 0.1)
    assert float((y - x).abs().max()) <= 0.1 + 1e-6
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_augment_crop_and_flip() -> None:
    x = torch.rand(5, 2, 6, 6)
    u = per_sample_uniform(torch.arange(5), (3,), seed=0, epoch=0)
    assert augment(x, "none", 2, u) is x
    flipped = augment(x, "flip", 0, torch.tensor([[0.0, 0.0, 0.1]] * 5))
    assert torch.equal(flipped, x.flip(3))
    centred = augment(x, "crop", 2, torch.full((5, 3), 0.5))  # offset 2 of 0..4 = no shift
    assert torch.equal(centred, x)
    shifted = augment(x, "crop", 1, torch.zeros(5, 3))  # offset 0: content moves down/right by 1
    assert torch.equal(shifted[:, :, 1:, 1:], x[:, :, :-1, :-1])
    assert float(shifted[:, :, 0, :].abs().sum()) == 0.0
    assert augment(x, "crop_flip", 2, u).shape == x.shape
