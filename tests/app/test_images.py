"""Data loading for the CLI (cbd_fast/app/images.py): image folders, tensor files, subsets, labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbd_fast.app import images as imagedata

PIL = pytest.importorskip("PIL.Image")


def _png(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(array).save(path)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(3):
            _png(tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 256, (10, 12), dtype=np.uint8))
    return tmp_path / "imgs"


def test_folder_recursive_sorted_with_imagefolder_labels(folder):
    data = imagedata.load_images(folder, show_progress=False)
    assert data.images.shape == (6, 1, 10, 12) and data.images.dtype == torch.uint8
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.files == sorted(data.files)
    first = np.array(PIL.open(folder / "cat" / "0.png"))
    assert torch.equal(data.images[0, 0], torch.from_numpy(first))
    f = data.float_images()
    assert f.dtype == torch.float32 and float(f.min()) >= 0.0 and float(f.max()) <= 1.0


def test_folder_rgb_jpeg_and_channel_conversion(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        PIL.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg", quality=95)
    assert imagedata.load_images(tmp_path).images.shape == (2, 3, 8, 8)
    assert imagedata.load_images(tmp_path, channels=1).images.shape == (2, 1, 8, 8)
    assert imagedata.load_images(tmp_path).labels is None  # no class subfolders


def test_mixed_sizes_name_two_files_and_resize_fixes_it(folder):
    _png(folder / "dog" / "big.png", np.zeros((20, 16), dtype=np.uint8))
    with pytest.raises(
        ValueError, match=r"different sizes: .*0\.png is 12x10, .*big\.png is 16x20; pass --image-size"
    ):
        imagedata.load_images(folder)
    data = imagedata.load_images(folder, image_size=8)
    assert data.images.shape == (7, 1, 8, 8) and "resized" in data.notes[0]
    data = imagedata.load_images(folder, expected_size=(6, 4))  # the model's size when no --image-size
    assert data.images.shape[-2:] == (6, 4)


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images .* found under"):
        imagedata.load_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="data not found"):
        imagedata.load_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="single image"):
        _png(tmp_path / "one.png", np.zeros((4, 4), dtype=np.uint8))
        imagedata.load_images(tmp_path / "one.png")


def test_corrupt_image_names_the_file(tmp_path):
    _png(tmp_path / "ok.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        imagedata.load_images(tmp_path)


@pytest.mark.parametrize("shape", [(5, 7, 7), (5, 1, 7, 7), (5, 3, 7, 7), (5, 7, 7, 3)])
def test_tensor_files_uint8_and_float(tmp_path, shape):
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "u8.npy", u8)
    torch.save(torch.from_numpy(u8.astype(np.float32) / 255), tmp_path / "f.pt")
    a = imagedata.load_images(tmp_path / "u8.npy")
    b = imagedata.load_images(tmp_path / "f.pt")
    assert a.images.dtype == torch.uint8 and b.images.dtype == torch.float32
    assert a.images.dim() == 4 and a.images.shape[0] == 5 and a.images.shape[2:] == (7, 7)
    assert torch.allclose(a.float_images(), b.images)


def test_tensor_file_containers_and_labels(tmp_path):
    x = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8)
    y = torch.arange(6) % 3
    torch.save({"images": x, "labels": y}, tmp_path / "d.pt")
    torch.save((x, y), tmp_path / "t.pt")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    for name in ("d.pt", "t.pt", "d.npz"):
        data = imagedata.load_images(tmp_path / name)
        assert torch.equal(data.images, x) and torch.equal(data.labels, y)
    grey = imagedata.load_images(tmp_path / "d.pt", channels=3)
    assert grey.images.shape == (6, 3, 5, 5) and "repeated" in grey.notes[0]


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.full((2, 4, 4), 3.0, dtype=np.float32), r"must be in \[0, 1\]; got min 3, max 3"),
        (np.full((2, 4, 4), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((2, 4), dtype=np.uint8), r"\[N, C, H, W\] or \[N, H, W\]; got shape \[2, 4\]"),
        (np.zeros((0, 4, 4), dtype=np.uint8), "no images"),
        (np.zeros((2, 4, 4), dtype=np.int32), "uint8 or float; got dtype int32"),
    ],
)
def test_bad_tensor_files(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises((ValueError, TypeError), match=match):
        imagedata.load_images(tmp_path / "bad.npy")


def test_unreadable_and_unknown_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read tensor file"):
        imagedata.load_images(tmp_path / "x.pt")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="folder of images or a"):
        imagedata.load_images(tmp_path / "x.csv")
    torch.save({"foo": torch.zeros(2, 4, 4), "bar": torch.zeros(2)}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match="expected an image tensor under one of"):
        imagedata.load_images(tmp_path / "k.pt")


def test_subset_is_seeded_sorted_and_validated():
    a = imagedata.subset(100, limit=10, seed=3)
    assert a.tolist() == sorted(a.tolist()) and len(a) == 10
    assert torch.equal(a, imagedata.subset(100, limit=10, seed=3))
    assert not torch.equal(a, imagedata.subset(100, limit=10, seed=4))
    assert len(imagedata.subset(100, fraction=0.05)) == 5
    assert imagedata.subset(100, limit=500) is None and imagedata.subset(100) is None
    for kwargs, match in (
        ({"limit": 0}, "limit"),
        ({"fraction": 1.5}, "fraction"),
        ({"limit": 1, "fraction": 0.5}, "not both"),
    ):
        with pytest.raises(ValueError, match=match):
            imagedata.subset(10, **kwargs)


def test_folder_subset_decodes_only_chosen_files(folder):
    data = imagedata.load_images(folder, limit=2, seed=0)
    assert len(data) == 2 and len(data.files) == 2 and "seeded subset" in data.notes[-1]
    assert data.labels.shape == (2,)


def test_labels_files(tmp_path):
    (tmp_path / "l.txt").write_text("0\n1\n2\n")
    np.save(tmp_path / "l.npy", np.array([[0], [1], [2]]))
    torch.save({"targets": torch.tensor([0, 1, 2])}, tmp_path / "l.pt")
    for name in ("l.txt", "l.npy", "l.pt"):
        assert imagedata.load_labels(tmp_path / name, n=3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        imagedata.load_labels(tmp_path / "l.txt", n=4)
    (tmp_path / "bad.txt").write_text("a b")
    with pytest.raises(ValueError, match="integers"):
        imagedata.load_labels(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError):
        imagedata.load_labels(tmp_path / "none.txt")


def test_resize_center_crop_and_parse_size():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8) / 128
    assert imagedata.resize_center_crop(x, (8, 8)) is x
    assert imagedata.resize_center_crop(x, (4, 2)).shape == (2, 1, 4, 2)
    u8 = (x * 100).to(torch.uint8)
    assert imagedata.resize_center_crop(u8, (16, 16)).dtype == torch.uint8
    assert imagedata.parse_image_size("32") == (32, 32) and imagedata.parse_image_size("24x32") == (24, 32)
    assert imagedata.parse_image_size((3, 4)) == (3, 4) and imagedata.parse_image_size(None) is None
    for bad in ("big", "0", (1, 2, 3), True):
        with pytest.raises(ValueError, match="image_size"):
            imagedata.parse_image_size(bad)


def test_fashion_mnist_dataset():
    try:
        data = imagedata.load_dataset("fashion-mnist", split="test", limit=50, seed=1)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not installed (apt-get install -y dataset-fashion-mnist)")
    assert data.images.shape == (50, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.shape == (50,) and data.source == "fashion-mnist:test"
    with pytest.raises(ValueError, match="dataset must be one of"):
        imagedata.load_dataset("cifar-10")


def test_labels_for_the_whole_source_follow_the_subset(tmp_path, folder):
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "y.txt").write_text(" ".join(str(i) for i in range(10)))
    data = imagedata.load_images(tmp_path / "x.pt", labels=tmp_path / "y.txt", limit=4, seed=5)
    idx = imagedata.subset(10, limit=4, seed=5)
    assert torch.equal(data.images, x[idx]) and data.labels.tolist() == idx.tolist()
    six = torch.arange(6) + 10  # folder: overrides the class-folder labels, in sorted-file order
    data = imagedata.load_images(folder, labels=six, fraction=0.5, seed=1)
    assert data.labels.tolist() == (imagedata.subset(6, fraction=0.5, seed=1) + 10).tolist()
    assert data.classes is None
    with pytest.raises(ValueError, match=r"shape \[10\]"):
        imagedata.load_images(tmp_path / "x.pt", labels=torch.arange(3))
