"""Datasets are written in their real on-disk formats to tmp_path and read back through torchvision's own loaders."""

from __future__ import annotations

import io
import pickle
import struct
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from diffusion.data.datasets import DigitsDataset, build_dataset, center_crop_arr
from diffusion.data.stream import InfiniteSampler
from diffusion.errors import DatasetNotFoundError
from diffusion.evaluation.digits import digits_classifier_accuracy, make_digits_classifier
from diffusion.seeds import derive_seed


def _cfg(**kwargs: object) -> ConfigDict:
    return ConfigDict(kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# CIFAR-10


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), as the real CIFAR-10 files (made with Python 2's cPickle)
    do: they load with str keys under encoding="latin1" (torchvision) and bytes keys under encoding="bytes"."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def _py2_dump(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar10(root: Path, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Five training batches and a test batch of ``per_batch`` random images each; returns {file: (data, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane, row-major
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch_label = "testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5"
        filenames = [f"image_{i}_{j}.png" for j in range(per_batch)]
        _py2_dump({"batch_label": batch_label, "labels": labels, "data": data, "filenames": filenames}, folder / name)
        batches[name] = (data, labels)
    _py2_dump({"num_cases_per_batch": per_batch, "label_names": CIFAR_CLASSES, "num_vis": 3072},
              folder / "batches.meta")
    return batches


def test_fake_cifar_pickles_decode_like_the_real_files(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert set(pickle.load(f, encoding="bytes")) == {b"batch_label", b"labels", b"data", b"filenames"}


def test_cifar10_values_and_labels(tmp_path: Path) -> None:
    batches = _write_cifar10(tmp_path)
    ds = build_dataset(_cfg(name="cifar10", root=str(tmp_path), random_flip=False, verify_checksums=False))
    assert len(ds) == 15
    data, labels = batches["data_batch_2"]
    item = ds[3 + 1]  # second image of the second batch
    assert set(item) == {"x", "y"}
    assert item["x"].dtype == torch.float32 and item["x"].shape == (3, 32, 32)
    assert item["y"].dtype == torch.int64 and item["y"].shape == () and item["y"].item() == labels[1]
    expected = torch.from_numpy(data[1].reshape(3, 32, 32).astype(np.float32) / 127.5 - 1)
    torch.testing.assert_close(item["x"], expected)
    c, h, w = 1, 5, 17  # a known pixel: green plane, row 5, column 17
    assert item["x"][c, h, w].item() == pytest.approx(data[1, c * 1024 + h * 32 + w] / 127.5 - 1, abs=1e-6)
    xs = torch.stack([ds[i]["x"] for i in range(len(ds))])
    assert xs.min() >= -1 and xs.max() <= 1 and xs.min() < -0.99 and xs.max() > 0.99

    test = build_dataset(_cfg(name="cifar10", root=str(tmp_path), verify_checksums=False), train=False)
    assert len(test) == 3 and test[2]["y"].item() == batches["test_batch"][1][2]


def test_cifar10_random_flip(tmp_path: Path) -> None:
    batches = _write_cifar10(tmp_path)
    original = torch.from_numpy(batches["data_batch_1"][0][0].reshape(3, 32, 32).astype(np.float32) / 127.5 - 1)
    cfg = _cfg(name="cifar10", root=str(tmp_path), random_flip=True, verify_checksums=False)
    torch.manual_seed(0)
    draws = [build_dataset(cfg)[0]["x"] for _ in range(40)]
    flipped = [torch.equal(x, original.flip(-1)) for x in draws]
    assert all(f or torch.equal(x, original) for f, x in zip(flipped, draws, strict=True))
    assert 0 < sum(flipped) < len(draws)
    eval_ds = build_dataset(cfg, train=False)  # no augmentation when not training
    expected = torch.from_numpy(batches["test_batch"][0][0].reshape(3, 32, 32).astype(np.float32) / 127.5 - 1)
    assert all(torch.equal(eval_ds[0]["x"], expected) for _ in range(10))


def test_cifar10_checksums_are_verified_by_default(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    with pytest.raises(RuntimeError, match="md5.*data_batch_1.*verify_checksums=False"):
        build_dataset(_cfg(name="cifar10", root=str(tmp_path)))


def test_cifar10_rejects_other_image_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32x32"):
        build_dataset(_cfg(name="cifar10", root=str(tmp_path), image_size=64))


# ----------------------------------------------------------------------------------------------------------------------
# CelebA

CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
OUTSIDE, LEFT_FACE, RIGHT_FACE = (230, 20, 20), (20, 110, 230), (40, 200, 60)


def _write_celeba(root: Path, partitions: tuple[int, ...] = (0, 0, 0, 1, 1, 2, 2)) -> None:
    """Aligned 178x218 JPEGs whose U-ViT crop (rows 57..184, cols 25..152) is LEFT_FACE | RIGHT_FACE (split at
    column 89) on an OUTSIDE background, plus the five annotation files in their published formats."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    image = np.full((218, 178, 3), OUTSIDE, dtype=np.uint8)
    image[57:185, 25:89] = LEFT_FACE
    image[57:185, 89:153] = RIGHT_FACE
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for name in names:
        Image.fromarray(image).save(folder / "img_align_celeba" / name, quality=100, subsampling=0)
    n = len(names)
    rows = {
        "list_eval_partition.txt": [f"{name} {p}" for name, p in zip(names, partitions, strict=True)],
        "identity_CelebA.txt": [f"{name} {2880 + i}" for i, name in enumerate(names)],
        "list_attr_celeba.txt": [str(n), " ".join(CELEBA_ATTRS) + " "]
        + [name + "".join(f" {(-1) ** (i + j):2d}" for j in range(40)) for i, name in enumerate(names)],
        "list_bbox_celeba.txt": [str(n), "image_id x_1 y_1 width height"]
        + [f"{name}    95  71 226 313" for name in names],
        "list_landmarks_align_celeba.txt": [
            str(n),
            "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y",
        ]
        + [f"{name} 69  109  106  113   77  142   73  152  108  154" for name in names],
    }
    for filename, lines in rows.items():
        (folder / filename).write_text("\n".join(lines) + "\n")


def _unit(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 127.5 - 1


def test_celeba64_crop_geometry(tmp_path: Path) -> None:
    _write_celeba(tmp_path)
    ds = build_dataset(_cfg(name="celeba64", root=str(tmp_path), image_size=64, random_flip=False,
                            verify_checksums=False))
    assert len(ds) == 3
    item = ds[0]
    assert set(item) == {"x"}  # unconditional
    x = item["x"]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
    # Every output pixel, borders included, comes from inside the crop: a crop shifted by one pixel would pull
    # OUTSIDE into the first/last rows or columns.
    tol = 4 / 127.5  # JPEG at quality 100, 4:4:4
    assert (x[:, :, :31] - _unit(LEFT_FACE)).abs().max() < tol
    assert (x[:, :, 33:] - _unit(RIGHT_FACE)).abs().max() < tol

    valid = build_dataset(_cfg(name="celeba64", root=str(tmp_path), verify_checksums=False), train=False)
    assert len(valid) == 2
    assert len(build_dataset(_cfg(name="celeba64", root=str(tmp_path), split="all", verify_checksums=False))) == 7


def test_celeba64_flip_and_size(tmp_path: Path) -> None:
    _write_celeba(tmp_path)
    ds = build_dataset(_cfg(name="celeba64", root=str(tmp_path), image_size=32, verify_checksums=False))
    torch.manual_seed(0)
    left_is_left = [(ds[1]["x"][:, :, :8] - _unit(LEFT_FACE)).abs().max().item() < 0.05 for _ in range(30)]
    assert ds[1]["x"].shape == (3, 32, 32)
    assert 0 < sum(left_is_left) < len(left_is_left)


def test_celeba64_checksums_are_verified_by_default(tmp_path: Path) -> None:
    _write_celeba(tmp_path)
    with pytest.raises(RuntimeError, match="md5.*list_attr_celeba.txt.*verify_checksums=False"):
        build_dataset(_cfg(name="celeba64", root=str(tmp_path)))


# ----------------------------------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)

GREEN, RED, BLUE = (30, 180, 60), (220, 30, 30), (30, 30, 220)


def _bordered(width: int = 300, height: int = 200, border: int = 40) -> Image.Image:
    """Green image with red/blue left/right borders narrower than the part the ADM centre crop removes."""
    arr = np.full((height, width, 3), GREEN, dtype=np.uint8)
    arr[:, :border] = RED
    arr[:, width - border :] = BLUE
    return Image.fromarray(arr)


def _write_imagefolder(root: Path) -> None:
    for wnid, count in (("n01440764", 2), ("n01443537", 3)):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(count):
            _bordered().save(root / "train" / wnid / f"{wnid}_{i}.png")
    (root / "val" / "n01443537").mkdir(parents=True)
    _bordered().save(root / "val" / "n01443537" / "val_0.JPEG", quality=100, subsampling=0)


def test_center_crop_arr_matches_hand_computation() -> None:
    # 256x128 image, res 64: one BOX halving (128 >= 2*64) gives 128x64, the BICUBIC step is then the identity,
    # and the centre crop keeps columns 32..95. Pixels are constant on 2x2 blocks, so the halving is exact.
    small = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    image = Image.fromarray(small.repeat(2, axis=0).repeat(2, axis=1))
    out = center_crop_arr(image, 64)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out, small[:, 32:96])
    # 300x200 -> BOX 150x100 -> BICUBIC 96x64 -> columns 16..79, beyond the (scaled) 40-pixel borders.
    out = center_crop_arr(_bordered(), 64)
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - np.array(GREEN)).max() <= 2


def test_imagenet_imagefolder(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path)
    ds = build_dataset(_cfg(name="imagenet", root=str(tmp_path), image_size=64))
    assert len(ds) == 5
    assert [ds[i]["y"].item() for i in range(5)] == [0, 0, 1, 1, 1]  # sorted wnids
    for i in range(5):
        x = ds[i]["x"]
        assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
        assert (x - _unit(GREEN)).abs().max() < 3 / 127.5  # borders cropped away, whichever way it is flipped
    val = build_dataset(_cfg(name="imagenet", root=str(tmp_path), image_size=32), train=False)
    assert len(val) == 1 and val[0]["x"].shape == (3, 32, 32) and val[0]["y"].item() == 0


def test_imagenet_flip(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # white left half
    Image.fromarray(arr).save(tmp_path / "train" / "a" / "img.png")
    ds = build_dataset(_cfg(name="imagenet", root=str(tmp_path), image_size=40))
    torch.manual_seed(0)
    left_white = [ds[0]["x"][:, :, 0].mean().item() > 0 for _ in range(30)]
    assert 0 < sum(left_white) < len(left_white)
    ds = build_dataset(_cfg(name="imagenet", root=str(tmp_path), image_size=40, random_flip=False))
    assert all(ds[0]["x"][:, :, 0].mean().item() == 1.0 for _ in range(10))


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_imagenet_corrupt_file_is_named(tmp_path: Path, corruption: str) -> None:
    _write_imagefolder(tmp_path)
    path = tmp_path / "train" / "n01440764" / "n01440764_9.JPEG"
    if corruption == "garbage":
        path.write_bytes(b"not an image at all")
    else:
        buffer = io.BytesIO()
        _bordered().save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    ds = build_dataset(_cfg(name="imagenet", root=str(tmp_path), image_size=64))
    with pytest.raises(OSError, match=str(path)):
        ds[2]


# ----------------------------------------------------------------------------------------------------------------------
# Missing data, unknown names


@pytest.mark.parametrize(
    ("name", "looked_for", "fix"),
    [
        ("cifar10", "cifar-10-batches-py", "download=True"),
        ("celeba64", "celeba", "Google Drive"),
        ("imagenet", "train", "ImageFolder"),
    ],
)
def test_missing_dataset(tmp_path: Path, name: str, looked_for: str, fix: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(_cfg(name=name, root=str(tmp_path), image_size=32))
    message = str(info.value)
    assert str(tmp_path / looked_for) in message and fix in message
    assert isinstance(info.value, FileNotFoundError)


def test_imagenet_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match="ImageFolder"):
        build_dataset(_cfg(name="imagenet", root=str(tmp_path), image_size=64))


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="digits, cifar10, celeba64, imagenet"):
        build_dataset(_cfg(name="mnist", root="/nonexistent"))


# ----------------------------------------------------------------------------------------------------------------------
# Digits


def test_digits() -> None:
    ds = build_dataset(_cfg(name="digits", random_flip=False))
    digits = load_digits()
    assert len(ds) == 1797
    item = ds[0]
    assert item["x"].dtype == torch.float32 and item["x"].shape == (1, 8, 8)
    assert item["y"].dtype == torch.int64 and item["y"].item() == digits.target[0]
    torch.testing.assert_close(item["x"][0], torch.from_numpy(digits.images[0] / 16 * 2 - 1).float())
    assert ds.x.min() == -1 and ds.x.max() == 1
    assert sorted(ds.y.unique().tolist()) == list(range(10))
    assert all(torch.equal(ds[5]["x"], ds.x[5]) for _ in range(10))  # no flip when random_flip=False


# ----------------------------------------------------------------------------------------------------------------------
# InfiniteSampler


def _take(sampler: InfiniteSampler, count: int) -> list[int]:
    return list(islice(iter(sampler), count))


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))).tolist()


def test_sampler_epochs_are_seeded_permutations() -> None:
    n = 7
    stream = _take(InfiniteSampler(n, seed=3), 5 * n)
    for e in range(5):
        assert stream[e * n : (e + 1) * n] == _epoch_order(n, 3, e)
    assert _take(InfiniteSampler(n, seed=3), 5 * n) == stream  # deterministic
    assert _take(InfiniteSampler(n, seed=4), 5 * n) != stream
    assert _take(InfiniteSampler(n, shuffle=False), 2 * n + 2) == [*range(n), *range(n), 0, 1]


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_sampler_ranks_partition_the_global_stream(world_size: int) -> None:
    n = 5
    stream = _take(InfiniteSampler(n, seed=1), 12 * world_size)
    for rank in range(world_size):
        assert _take(InfiniteSampler(n, rank, world_size, seed=1), 12) == stream[rank::world_size]


@pytest.mark.parametrize("start", [3, 7, 10, 14, 23])  # mid-epoch, on and across epoch boundaries (n = 7)
@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_resume_continues_the_stream(start: int, world_size: int) -> None:
    n = 7
    stream = _take(InfiniteSampler(n, seed=0), 100)
    for rank in range(world_size):
        resumed = _take(InfiniteSampler(n, rank, world_size, start_index=start), 20)
        assert resumed == [i for p, i in enumerate(stream) if p >= start and p % world_size == rank][:20]


def test_sampler_jumps_to_far_epochs() -> None:
    n, epoch = 10, 10**11
    resumed = _take(InfiniteSampler(n, seed=2, start_index=epoch * n + 4), 3)
    assert resumed == _epoch_order(n, 2, epoch)[4:7]


def test_sampler_validates_arguments() -> None:
    with pytest.raises(ValueError):
        InfiniteSampler(0)
    with pytest.raises(ValueError):
        InfiniteSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError):
        InfiniteSampler(10, start_index=-1)


def test_sampler_drives_a_dataloader() -> None:
    ds = DigitsDataset()
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=InfiniteSampler(len(ds), seed=0))
    batch = next(iter(loader))
    expected = torch.randperm(len(ds), generator=torch.Generator().manual_seed(derive_seed(0, "epoch", 0)))[:16]
    torch.testing.assert_close(batch["x"], ds.x[expected])
    torch.testing.assert_close(batch["y"], ds.y[expected])


# ----------------------------------------------------------------------------------------------------------------------
# Digits classifier


def test_digits_classifier_generalises() -> None:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    assert make_digits_classifier().fit(x_train, y_train).score(x_test, y_test) > 0.98


def test_digits_classifier_accuracy() -> None:
    ds = DigitsDataset()
    assert digits_classifier_accuracy(ds.x, ds.y) > 0.99
    assert digits_classifier_accuracy(ds.x, (ds.y + 1) % 10) < 0.01
    noise = torch.rand(2000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert 0.05 < digits_classifier_accuracy(noise, torch.arange(2000) % 10) < 0.15
    assert digits_classifier_accuracy(ds.x * 3, ds.y) > 0.99  # out-of-range values are clipped
    with pytest.raises(ValueError):
        digits_classifier_accuracy(ds.x[:, 0], ds.y)
