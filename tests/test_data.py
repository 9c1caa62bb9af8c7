"""Tests of cvdd.data: digits, class-per-folder trees, the decode cache, streaming and torchvision files.

Every expected value comes from data that the test writes itself or from scikit-learn directly.
"""

from __future__ import annotations

import logging
import pickle
import struct
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvdd.data
from cvdd.config import DataConfig
from cvdd.data import StreamSplit, TensorSplit, load_dataset, load_digits_dataset, load_imagefolder, sample_per_class
from cvdd.errors import DataError

CLASSES = ("cat", "dog", "emu")  # already in sorted order
TRAIN_PER_CLASS = 3
TEST_PER_CLASS = 2

IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Keep the default decode cache out of the home folder."""
    monkeypatch.setenv("CVDD_CACHE", str(tmp_path / "default-cache"))


# --- helpers that write test data ------------------------------------------------------------------


def write_image_tree(
    root: Path, size: int = 8, grey: bool = False, test_folder: str = "test", seed: int = 0,
    width: int | None = None,
) -> dict[str, dict[str, list[np.ndarray]]]:
    """Write random PNG images to root/train/<class>/ and root/<test_folder>/<class>/.

    Returns the written pixel arrays by split ("train", "test") and class, in file-name order.
    Grey arrays are (H, W) and RGB arrays are (H, W, 3).
    """
    rng = np.random.default_rng(seed)
    width = width or size
    pixels: dict[str, dict[str, list[np.ndarray]]] = {"train": {}, "test": {}}
    for split, folder, count in (("train", "train", TRAIN_PER_CLASS), ("test", test_folder, TEST_PER_CLASS)):
        for cls in CLASSES:
            class_dir = root / folder / cls
            class_dir.mkdir(parents=True)
            shape = (size, width) if grey else (size, width, 3)
            arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
            for index, array in enumerate(arrays):
                Image.fromarray(array).save(class_dir / f"img{index}.png")
            pixels[split][cls] = arrays
    return pixels


def expected_split(pixels, split: str, class_order, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack written arrays as the loader should: classes in `class_order`, then files by name."""
    images, labels = [], []
    for label, cls in enumerate(class_order):
        for array in pixels[split][cls]:
            chw = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
            if chw.shape[0] == 1 and channels == 3:
                chw = np.repeat(chw, 3, axis=0)
            images.append(torch.from_numpy(np.ascontiguousarray(chw)))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def write_zip(folder: Path, path: Path, top: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                name = file.relative_to(folder).as_posix()
                archive.write(file, f"{top}/{name}" if top else name)
    return path


def write_tar(folder: Path, path: Path, mode: str = "w", top: str | None = None) -> Path:
    with tarfile.open(path, mode) as archive:
        for child in sorted(folder.iterdir()):
            archive.add(child, arcname=f"{top}/{child.name}" if top else child.name)
    return path


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"data": data, label_key: labels}, handle)


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """Write an IDX file: big-endian magic number and dimension sizes, then the unsigned bytes."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def class_order_file(path: Path, names) -> str:
    path.write_text("\n".join(names) + "\n")
    return str(path)


# --- digits ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_digits_split_sizes_and_shape(digits):
    assert len(digits.train) == 1437
    assert len(digits.test) == 360
    assert tuple(digits.train.images.shape) == (1437, 1, 8, 8)
    assert tuple(digits.test.images.shape) == (360, 1, 8, 8)
    assert digits.train.images.dtype == torch.uint8
    assert digits.test.images.dtype == torch.uint8
    assert digits.num_classes == 10
    assert digits.channels == 1
    assert digits.image_size == 8


def test_digits_split_is_stratified(digits, sklearn_digits):
    class_sizes = Counter(sklearn_digits.target.tolist())
    test_counts = Counter(digits.test.labels.tolist())
    train_counts = Counter(digits.train.labels.tolist())
    for label in range(10):
        assert abs(test_counts[label] - 36) <= 1, f"class {label} has {test_counts[label]} test images"
        assert train_counts[label] + test_counts[label] == class_sizes[label]


def test_digits_pixels_are_sklearn_values_scaled(digits, sklearn_digits):
    # Scaling 0..16 to 0..255 maps each sklearn value v to round(v * 255 / 16).
    scaled = np.round(sklearn_digits.images * 255.0 / 16.0).astype(np.uint8)
    expected = Counter((image.tobytes(), int(label)) for image, label in zip(scaled, sklearn_digits.target))

    loaded = Counter()
    for split in (digits.train, digits.test):
        for image, label in zip(split.images.numpy(), split.labels.tolist()):
            loaded[(image[0].tobytes(), label)] += 1

    assert loaded == expected
    assert int(digits.train.images.max()) == 255
    assert int(digits.train.images.min()) == 0


def test_digits_stats_match_train_split(digits):
    pixels = digits.train.images.double() / 255.0
    assert digits.mean == pytest.approx((pixels.mean().item(),), abs=1e-4)
    assert digits.std == pytest.approx((pixels.std(unbiased=False).item(),), abs=1e-4)


# --- imagefolder: sources, labels and pixels -------------------------------------------------------------------


def test_imagefolder_folder_classes_labels_pixels(tmp_path):
    pixels = write_image_tree(tmp_path / "pets")

    dataset = load_imagefolder(tmp_path / "pets", cache_dir=tmp_path / "cache")

    assert dataset.class_names == sorted(CLASSES)
    assert dataset.channels == 3
    assert dataset.image_size == 8
    assert dataset.name == "pets"
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        images, labels = expected_split(pixels, split_name, CLASSES, channels=3)
        assert isinstance(split, TensorSplit)
        assert split.images.dtype == torch.uint8
        assert torch.equal(split.labels, labels)
        assert torch.equal(split.images, images)


def test_imagefolder_stats_match_train_split(tmp_path):
    pixels = write_image_tree(tmp_path / "pets")

    dataset = load_imagefolder(tmp_path / "pets", cache_dir=tmp_path / "cache")

    train = np.stack([a for cls in CLASSES for a in pixels["train"][cls]]).astype(np.float64) / 255.0
    assert dataset.mean == pytest.approx(tuple(train.mean(axis=(0, 1, 2))), abs=1e-4)
    assert dataset.std == pytest.approx(tuple(train.std(axis=(0, 1, 2))), abs=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_grey_images_channels(tmp_path, channels):
    pixels = write_image_tree(tmp_path / "grey", size=16, grey=True)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "grey"), channels=channels,
                     cache_dir=str(tmp_path / "cache"))

    dataset = load_dataset(cfg)

    assert dataset.channels == channels
    assert dataset.image_size == 16
    assert len(dataset.mean) == channels
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        images, labels = expected_split(pixels, split_name, CLASSES, channels=channels)
        assert tuple(split.images.shape[1:]) == (channels, 16, 16)
        assert torch.equal(split.images, images)
        assert torch.equal(split.labels, labels)


def test_imagefolder_rgb_as_one_channel(tmp_path):
    pixels = write_image_tree(tmp_path / "pets")

    grey = load_imagefolder(tmp_path / "pets", channels=1, cache_dir=tmp_path / "cache")

    assert grey.channels == 1
    assert tuple(grey.train.images.shape) == (len(CLASSES) * TRAIN_PER_CLASS, 1, 8, 8)
    assert len(grey.mean) == 1
    # Pillow's "L" conversion of the written RGB array is the expected luma.
    luma = np.asarray(Image.fromarray(pixels["train"][CLASSES[0]][0]).convert("L"))
    assert np.array_equal(grey.train.images[0, 0].numpy(), luma)


@pytest.mark.parametrize(
    "archive, top",
    [("zip", None), ("tar", None), ("tar.gz", None), ("zip", "wrapper"), ("tar", "wrapper"), ("tar.gz", "wrapper")],
)
def test_imagefolder_archive_matches_folder(tmp_path, archive, top):
    tree = tmp_path / "tree"
    pixels = write_image_tree(tree)
    path = tmp_path / f"pets.{archive}"
    if archive == "zip":
        write_zip(tree, path, top=top)
    else:
        write_tar(tree, path, mode="w:gz" if archive == "tar.gz" else "w", top=top)

    from_folder = load_imagefolder(tree, cache_dir=tmp_path / "cache")
    from_archive = load_imagefolder(path, cache_dir=tmp_path / "cache")

    assert from_archive.name == "pets"
    assert from_archive.class_names == from_folder.class_names
    for split_name in ("train", "test"):
        images, labels = expected_split(pixels, split_name, CLASSES, channels=3)
        archive_split = getattr(from_archive, split_name)
        folder_split = getattr(from_folder, split_name)
        assert torch.equal(archive_split.images, images)
        assert torch.equal(archive_split.labels, labels)
        assert torch.equal(archive_split.images, folder_split.images)
    assert from_archive.mean == from_folder.mean
    assert from_archive.std == from_folder.std


def test_imagefolder_tar_of_dot_folder(tmp_path):
    """`tar -C tree .` stores member names as ./train/<class>/<file>."""
    tree = tmp_path / "tree"
    pixels = write_image_tree(tree)
    path = tmp_path / "dotted.tar"
    with tarfile.open(path, "w") as archive:
        archive.add(tree, arcname=".")

    dataset = load_imagefolder(path, cache_dir=tmp_path / "cache")

    images, labels = expected_split(pixels, "train", CLASSES, channels=3)
    assert torch.equal(dataset.train.images, images)
    assert torch.equal(dataset.train.labels, labels)


def test_imagefolder_val_folder_as_test_split(tmp_path):
    tree = tmp_path / "tree"
    pixels = write_image_tree(tree, test_folder="val")
    write_zip(tree, tmp_path / "pets.zip", top="pets")

    for root in (tree, tmp_path / "pets.zip"):
        dataset = load_imagefolder(root, cache_dir=tmp_path / "cache")
        images, labels = expected_split(pixels, "test", CLASSES, channels=3)
        assert torch.equal(dataset.test.images, images), root
        assert torch.equal(dataset.test.labels, labels), root


def test_imagefolder_resize_crops_centre(tmp_path):
    # 8 rows by 16 columns: resizing the shorter side to 8 keeps the scale, so the
    # centre crop is exactly columns 4..11.
    pixels = write_image_tree(tmp_path / "wide", size=8, width=16)

    dataset = load_imagefolder(tmp_path / "wide", image_size=8, cache_dir=tmp_path / "cache")

    assert dataset.image_size == 8
    first = pixels["train"][CLASSES[0]][0]
    expected = torch.from_numpy(np.ascontiguousarray(first[:, 4:12].transpose(2, 0, 1)))
    assert tuple(dataset.train.images.shape) == (len(CLASSES) * TRAIN_PER_CLASS, 3, 8, 8)
    assert torch.equal(dataset.train.images[0], expected)


# --- class-order file ------------------------------------------------------------------------------------


def test_class_order_reversed_relabels(tmp_path):
    pixels = write_image_tree(tmp_path / "pets")
    reversed_order = list(reversed(CLASSES))
    order = class_order_file(tmp_path / "order.txt", reversed_order)

    dataset = load_imagefolder(tmp_path / "pets", class_order=order, cache_dir=tmp_path / "cache")

    assert dataset.class_names == reversed_order
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        images, labels = expected_split(pixels, split_name, reversed_order, channels=3)
        assert torch.equal(split.labels, labels)
        assert torch.equal(split.images, images)
    first_emu = pixels["train"]["emu"][0].transpose(2, 0, 1)
    assert int(dataset.train.labels[0]) == 0
    assert np.array_equal(dataset.train.images[0].numpy(), first_emu)


def test_class_order_unknown_class_raises(tmp_path):
    write_image_tree(tmp_path / "pets")
    order = class_order_file(tmp_path / "order.txt", [*CLASSES, "yak"])

    with pytest.raises(DataError) as info:
        load_imagefolder(tmp_path / "pets", class_order=order, cache_dir=tmp_path / "cache")

    assert order in str(info.value)
    assert "yak" in str(info.value)


def test_class_order_missing_class_raises(tmp_path):
    write_image_tree(tmp_path / "pets")
    order = class_order_file(tmp_path / "order.txt", CLASSES[:2])

    with pytest.raises(DataError) as info:
        load_imagefolder(tmp_path / "pets", class_order=order, cache_dir=tmp_path / "cache")

    assert order in str(info.value)
    assert CLASSES[2] in str(info.value)


# --- imagefolder: malformed trees ----------------------------------------------------------------------------


def test_non_images_skipped_in_one_warning(tmp_path, caplog):
    pixels = write_image_tree(tmp_path / "pets")
    (tmp_path / "pets" / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "pets" / "test" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "pets" / "train" / "README.md").write_text("outside any class folder")

    with caplog.at_level(logging.WARNING, logger="cvdd.data"):
        dataset = load_imagefolder(tmp_path / "pets", cache_dir=tmp_path / "cache")

    warnings = [r for r in caplog.records if r.name == "cvdd.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3 files" in warnings[0].getMessage()
    images, _ = expected_split(pixels, "train", CLASSES, channels=3)
    assert torch.equal(dataset.train.images, images)


def test_class_folder_without_images_raises(tmp_path):
    write_image_tree(tmp_path / "pets")
    (tmp_path / "pets" / "train" / "yak").mkdir()
    (tmp_path / "pets" / "train" / "yak" / "notes.txt").write_text("no images here")
    (tmp_path / "pets" / "test" / "yak").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pets" / "test" / "yak" / "img0.png")

    with pytest.raises(DataError) as info:
        load_imagefolder(tmp_path / "pets", cache_dir=tmp_path / "cache")

    assert "train/yak" in str(info.value)


def test_train_test_class_mismatch_raises(tmp_path):
    write_image_tree(tmp_path / "pets")
    (tmp_path / "pets" / "train" / "yak").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pets" / "train" / "yak" / "img0.png")

    with pytest.raises(DataError) as info:
        load_imagefolder(tmp_path / "pets", cache_dir=tmp_path / "cache")

    assert "yak" in str(info.value)


def test_missing_test_folder_raises(tmp_path):
    write_image_tree(tmp_path / "pets", test_folder="holdout")

    with pytest.raises(DataError) as info:
        load_imagefolder(tmp_path / "pets", cache_dir=tmp_path / "cache")

    assert "test/" in str(info.value)


def test_imagefolder_missing_root_raises(tmp_path):
    missing = tmp_path / "no-such-folder"

    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="imagefolder", root=str(missing)))

    assert str(missing) in str(info.value)


# --- decode cache -------------------------------------------------------------------------------------------


def test_cache_written_then_read(tmp_path, caplog, monkeypatch):
    write_image_tree(tmp_path / "pets")
    cache_dir = tmp_path / "cache"

    first = load_imagefolder(tmp_path / "pets", cache_dir=cache_dir)

    cache_files = list(cache_dir.glob("*.pt"))
    assert len(cache_files) == 1
    assert Path(first.extra["cache_path"]) == cache_files[0]

    decoded = []
    real_decode = cvdd.data._decode

    def counting_decode(*args, **kwargs):
        decoded.append(args[-1])
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(cvdd.data, "_decode", counting_decode)
    with caplog.at_level(logging.INFO, logger="cvdd.data"):
        second = load_imagefolder(tmp_path / "pets", cache_dir=cache_dir)

    assert any("from cache" in r.getMessage() for r in caplog.records if r.name == "cvdd.data")
    # The loader decodes only the first train image, to learn the native size, before it reads the cache.
    assert len(decoded) <= 1
    assert second.identity == first.identity
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.train.labels, first.train.labels)
    assert torch.equal(second.test.images, first.test.images)
    assert torch.equal(second.test.labels, first.test.labels)


def test_cache_key_changes_with_content(tmp_path):
    write_image_tree(tmp_path / "pets")
    cache_dir = tmp_path / "cache"
    first = load_imagefolder(tmp_path / "pets", cache_dir=cache_dir)

    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "pets" / "train" / "cat" / "img9.png")
    second = load_imagefolder(tmp_path / "pets", cache_dir=cache_dir)

    assert second.identity != first.identity
    assert second.extra["cache_path"] != first.extra["cache_path"]
    assert len(list(cache_dir.glob("*.pt"))) == 2
    assert len(second.train) == len(first.train) + 1
    assert torch.equal(second.train.images[TRAIN_PER_CLASS], torch.full((3, 8, 8), 200, dtype=torch.uint8))


def test_cache_key_changes_with_class_order(tmp_path):
    write_image_tree(tmp_path / "pets")
    order = class_order_file(tmp_path / "order.txt", list(reversed(CLASSES)))

    sorted_order = load_imagefolder(tmp_path / "pets", cache_dir=tmp_path / "cache")
    reversed_order = load_imagefolder(tmp_path / "pets", class_order=order, cache_dir=tmp_path / "cache")

    assert reversed_order.identity != sorted_order.identity
    assert int(reversed_order.train.labels[0]) == 0
    assert reversed_order.class_names[0] == "emu"


# --- streaming of large images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1])
def test_large_images_stream(tmp_path, num_workers):
    pixels = write_image_tree(tmp_path / "big", size=72)
    cache_dir = tmp_path / "cache"

    dataset = load_imagefolder(tmp_path / "big", cache_dir=cache_dir, num_workers=num_workers)

    assert isinstance(dataset.train, StreamSplit)
    assert isinstance(dataset.test, StreamSplit)
    assert dataset.image_size == 72
    assert not cache_dir.exists() or not any(cache_dir.iterdir())

    images, labels = expected_split(pixels, "train", CLASSES, channels=3)
    batches = list(dataset.train.batches(batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 1]
    for batch_images, batch_labels in batches:
        assert batch_images.dtype == torch.uint8
        assert tuple(batch_images.shape[1:]) == (3, 72, 72)
        assert batch_labels.dtype == torch.long
    assert torch.equal(torch.cat([b[0] for b in batches]), images)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


def test_large_images_shuffled_batches_keep_labels(tmp_path):
    pixels = write_image_tree(tmp_path / "big", size=72)
    dataset = load_imagefolder(tmp_path / "big", cache_dir=tmp_path / "cache", num_workers=0)
    images, labels = expected_split(pixels, "test", CLASSES, channels=3)

    generator = torch.Generator().manual_seed(3)
    batches = list(dataset.test.batches(batch_size=4, shuffle=True, generator=generator, drop_last=True))

    assert [len(b[0]) for b in batches] == [4]
    for image, label in zip(batches[0][0], batches[0][1]):
        matches = [i for i in range(len(images)) if torch.equal(images[i], image)]
        assert len(matches) == 1
        assert int(labels[matches[0]]) == int(label)


def test_large_images_stats_match_train_split(tmp_path):
    pixels = write_image_tree(tmp_path / "big", size=72)

    dataset = load_imagefolder(tmp_path / "big", cache_dir=tmp_path / "cache", num_workers=0)

    train = np.stack([a for cls in CLASSES for a in pixels["train"][cls]]).astype(np.float64) / 255.0
    assert dataset.mean == pytest.approx(tuple(train.mean(axis=(0, 1, 2))), abs=1e-4)
    assert dataset.std == pytest.approx(tuple(train.std(axis=(0, 1, 2))), abs=1e-4)


# --- torchvision on-disk formats ---------------------------------------------------------------------------------


def test_cifar10_reads_pickled_batches(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_data, train_labels = [], []
    for index in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 2)]
        write_cifar_batch(folder / f"data_batch_{index}", data, labels, "labels")
        train_data.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", test_data, [9, 0, 4], "labels")
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": names, "num_vis": 3072}, handle)

    dataset = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))

    assert dataset.class_names == names
    assert dataset.channels == 3
    assert dataset.image_size == 32
    assert tuple(dataset.train.images.shape) == (10, 3, 32, 32)
    assert tuple(dataset.test.images.shape) == (3, 3, 32, 32)
    # Each CIFAR row contains the 1,024 red values, then green, then blue, each row-major.
    expected_train = np.concatenate(train_data).reshape(10, 3, 32, 32)
    assert np.array_equal(dataset.train.images.numpy(), expected_train)
    assert int(dataset.train.images[0, 1, 0, 0]) == int(train_data[0][0, 1024])
    assert dataset.train.labels.tolist() == train_labels
    assert np.array_equal(dataset.test.images.numpy(), test_data.reshape(3, 3, 32, 32))
    assert dataset.test.labels.tolist() == [9, 0, 4]
    assert dataset.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_cifar100_reads_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i:02d}" for i in range(100)]
    train_data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    test_data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    with open(folder / "train", "wb") as handle:
        pickle.dump({"data": train_data, "fine_labels": [99, 5, 0, 42], "coarse_labels": [1, 2, 3, 4]}, handle)
    with open(folder / "test", "wb") as handle:
        pickle.dump({"data": test_data, "fine_labels": [7, 63], "coarse_labels": [0, 0]}, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"group{i}" for i in range(20)]}, handle)

    dataset = load_dataset(DataConfig(dataset="cifar100", root=str(tmp_path)))

    assert dataset.class_names == names
    assert dataset.num_classes == 100
    assert dataset.train.labels.tolist() == [99, 5, 0, 42]
    assert dataset.test.labels.tolist() == [7, 63]
    assert np.array_equal(dataset.train.images.numpy(), train_data.reshape(4, 3, 32, 32))
    assert np.array_equal(dataset.test.images.numpy(), test_data.reshape(2, 3, 32, 32))


@pytest.mark.parametrize("kind, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_reads_idx_files(tmp_path, kind, folder):
    rng = np.random.default_rng(3)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    train_images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    train_labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    test_images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    test_labels = np.array([9, 2, 6], dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", IDX_IMAGES_MAGIC, train_images)
    write_idx(raw / "train-labels-idx1-ubyte", IDX_LABELS_MAGIC, train_labels)
    write_idx(raw / "t10k-images-idx3-ubyte", IDX_IMAGES_MAGIC, test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", IDX_LABELS_MAGIC, test_labels)

    dataset = load_dataset(DataConfig(dataset=kind, root=str(tmp_path)))

    assert dataset.channels == 1
    assert dataset.image_size == 28
    assert dataset.num_classes == 10
    assert dataset.train.images.dtype == torch.uint8
    assert tuple(dataset.train.images.shape) == (5, 1, 28, 28)
    assert tuple(dataset.test.images.shape) == (3, 1, 28, 28)
    assert np.array_equal(dataset.train.images[:, 0].numpy(), train_images)
    assert np.array_equal(dataset.test.images[:, 0].numpy(), test_images)
    assert dataset.train.labels.tolist() == train_labels.tolist()
    assert dataset.test.labels.tolist() == test_labels.tolist()
    if kind == "fashion-mnist":
        assert dataset.class_names[0] == "T-shirt/top"
        assert dataset.class_names[9] == "Ankle boot"
    else:
        assert dataset.class_names == [str(d) for d in range(10)]


def test_mnist_missing_idx_file_raises(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", IDX_IMAGES_MAGIC, np.zeros((1, 28, 28), np.uint8))

    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))

    assert "train-labels-idx1-ubyte" in str(info.value)
    assert "--download" in str(info.value)


# --- missing torchvision data ---------------------------------------------------------------------------------


def test_cifar10_missing_folder_names_folder_and_flag(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))

    assert "cifar-10-batches-py" in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert "--download" in str(info.value)


def test_cifar10_missing_root_names_root_and_flag(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(missing)))

    assert str(missing) in str(info.value)
    assert "--download" in str(info.value)
    assert not missing.exists()


def test_cifar10_missing_batch_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_cifar_batch(folder / "data_batch_1", np.zeros((1, 3072), np.uint8), [0], "labels")
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, handle)

    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))

    assert "data_batch_2" in str(info.value)


def test_root_required_for_non_digits():
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="cifar10"))

    assert "data.root" in str(info.value)


# --- sample_per_class -----------------------------------------------------------------------------------------


LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])  # class sizes 5, 4, 3


def test_sample_per_class_distinct_right_class():
    rows = sample_per_class(LABELS, num_classes=3, per_class=3, generator=torch.Generator().manual_seed(0))

    assert tuple(rows.shape) == (3, 3)
    for label, row in enumerate(rows):
        assert len(set(row.tolist())) == 3
        assert all(int(LABELS[i]) == label for i in row)


def test_sample_per_class_reproducible():
    first = sample_per_class(LABELS, 3, 2, torch.Generator().manual_seed(7))
    again = sample_per_class(LABELS, 3, 2, torch.Generator().manual_seed(7))
    draws = {tuple(sample_per_class(LABELS, 3, 2, torch.Generator().manual_seed(s)).flatten().tolist())
             for s in range(20)}

    assert torch.equal(first, again)
    assert len(draws) > 1


def test_sample_per_class_ipc_too_large_raises():
    with pytest.raises(DataError) as info:
        sample_per_class(LABELS, 3, 4, torch.Generator().manual_seed(0))

    assert "class 2 has 3 images" in str(info.value)
    assert "4 per class" in str(info.value)
