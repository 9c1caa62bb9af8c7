"""Dataset registry: digits, torchvision datasets and class-per-folder trees.

Every dataset is returned as an :class:`ImageDataset` with a train and a test split.
Images of 64 px or less are decoded once into a uint8 tensor cache on disk and held
in memory as `(N, C, H, W)` uint8 tensors; larger images stream from disk through a
DataLoader. Pixel values reach the models as floats in [0, 1], normalised with the
dataset's per-channel mean and std.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .runs import atomic_torch_save

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IN_MEMORY_MAX_SIZE = 64
CACHE_VERSION = 1

# Per-channel mean and std of the training split, as published with each dataset.
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


# --- splits ------------------------------------------------------------------------------------


class Split:
    """One split of a dataset: images with integer labels."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """Return the images at `indices`, shape (N, C, H, W), uint8."""
        raise NotImplementedError

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
        drop_last: bool = False, indices: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images (B, C, H, W), int64 labels (B,)) over the split or a subset of it."""
        raise NotImplementedError

    def indices_of_class(self, label: int) -> torch.Tensor:
        return torch.nonzero(self.labels == label).flatten()


class TensorSplit(Split):
    """A split held in memory as a uint8 tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def get(self, indices):
        return self.images[torch.as_tensor(indices, dtype=torch.long)]

    def batches(self, batch_size, shuffle=False, generator=None, drop_last=False, indices=None):
        order = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            batch = order[start:start + batch_size]
            yield self.images[batch], self.labels[batch]


class _FileImages(torch.utils.data.Dataset):
    """Decodes and resizes images from a folder or an archive, for a DataLoader."""

    def __init__(self, source: "_Source", names: list[str], image_size: int, channels: int):
        self.source = source
        self.names = names
        self.image_size = image_size
        self.channels = channels

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        return _decode(self.source.read(self.names[index]), self.image_size, self.channels, self.names[index])


class StreamSplit(Split):
    """A split of images larger than 64 px, decoded on demand by DataLoader workers."""

    def __init__(self, files: _FileImages, labels: torch.Tensor, num_workers: int):
        self.files = files
        self.labels = labels.long()
        self.num_workers = num_workers

    def get(self, indices):
        return torch.stack([self.files[int(i)] for i in indices])

    def batches(self, batch_size, shuffle=False, generator=None, drop_last=False, indices=None):
        order = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
        subset = torch.utils.data.Subset(self.files, order.tolist())
        loader = torch.utils.data.DataLoader(
            subset, batch_size=batch_size, shuffle=False, drop_last=drop_last,
            num_workers=self.num_workers, persistent_workers=False,
        )
        labels = self.labels[order]
        start = 0
        for images in loader:
            yield images, labels[start:start + len(images)]
            start += len(images)


# --- the dataset ---------------------------------------------------------------------------------


@dataclass
class ImageDataset:
    """A classification dataset with a train and a test split.

    Attributes:
        name: the dataset kind or the archive name.
        class_names: class names in label-index order.
        channels: 1 (grey) or 3 (RGB).
        image_size: side length in pixels (images are square).
        mean, std: per-channel statistics of the train split, for values in [0, 1].
        train, test: the splits.
        identity: a hash of the source and its content, stored with derived artifacts.
    """

    name: str
    class_names: list[str]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    test: Split
    identity: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images or floats in [0, 1] to normalised floats, shape kept."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map normalised floats back to [0, 1] (not clamped)."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return images * std + mean

    def describe(self) -> str:
        return (
            f"{self.name}: {self.num_classes} classes, {len(self.train)} train / {len(self.test)} test images, "
            f"{self.channels}x{self.image_size}x{self.image_size}"
        )


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), as fractions of 255."""
    x = images.double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(round(float(v), 4) for v in mean), tuple(round(max(float(v), 1e-3), 4) for v in std)


# --- digits --------------------------------------------------------------------------------------


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's bundled 8x8 digits with a fixed stratified split (1,437 train, 360 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Values are 0..16; scale to 0..255.
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=360, stratify=bunch.target, random_state=0
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train = TensorSplit(images[train_idx], labels[train_idx])
    test = TensorSplit(images[test_idx], labels[test_idx])
    mean, std = _channel_stats(train.images)
    return ImageDataset(
        name="digits", class_names=[str(d) for d in range(10)], channels=1, image_size=8,
        mean=mean, std=std, train=train, test=test, identity="digits-sklearn-v1",
    )


# --- torchvision datasets --------------------------------------------------------------------------


def _missing(kind: str, root: Path, looked_for: str) -> DataError:
    return DataError(
        f"dataset {kind!r} not found: {looked_for} is missing under {str(root)!r}; "
        f"pass --download (or data.download=true) to fetch it, or set data.root to the folder that contains it"
    )


def _load_cifar(kind: str, root: Path, download: bool) -> ImageDataset:
    """Read CIFAR-10/100 from torchvision's on-disk layout (pickled batches)."""
    folder, train_files, test_files, meta_file, label_key, names_key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                    "batches.meta", "labels", "label_names"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
    }[kind]
    base = root / folder
    if not base.is_dir() and download:
        import torchvision

        log.info("downloading %s into %s", kind, root)
        cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)
    if not base.is_dir():
        raise _missing(kind, root, f"folder {folder}/")

    def read(name):
        path = base / name
        if not path.is_file():
            raise _missing(kind, root, f"file {folder}/{name}")
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")

    def split(names):
        batches = [read(n) for n in names]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return TensorSplit(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))

    class_names = list(read(meta_file)[names_key])
    mean, std = KNOWN_STATS[kind]
    return ImageDataset(
        name=kind, class_names=class_names, channels=3, image_size=32, mean=mean, std=std,
        train=split(train_files), test=split(test_files), identity=f"{kind}-{_folder_fingerprint(base)}",
    )


def _load_mnist_like(kind: str, root: Path, download: bool) -> ImageDataset:
    import torchvision

    cls = torchvision.datasets.MNIST if kind == "mnist" else torchvision.datasets.FashionMNIST
    raw = root / cls.__name__ / "raw"
    needed = [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
    if download:
        cls(str(root), train=True, download=True)
    for name in needed:
        if not (raw / name).is_file():
            raise _missing(kind, root, f"file {cls.__name__}/raw/{name}")
    splits = {}
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        splits[train] = TensorSplit(ds.data.unsqueeze(1).to(torch.uint8).contiguous(), ds.targets.long())
    class_names = [str(d) for d in range(10)] if kind == "mnist" else FASHION_MNIST_CLASSES
    mean, std = KNOWN_STATS[kind]
    return ImageDataset(
        name=kind, class_names=class_names, channels=1, image_size=28, mean=mean, std=std,
        train=splits[True], test=splits[False], identity=f"{kind}-{_folder_fingerprint(raw)}",
    )


# --- class-per-folder trees ---------------------------------------------------------------------------


class _Source:
    """Read access to the files of a folder, a zip or a tar archive by relative POSIX path."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self._pid = None
        if path.is_dir():
            self.kind = "folder"
        elif zipfile.is_zipfile(path):
            self.kind = "zip"
        elif tarfile.is_tarfile(path):
            self.kind = "tar"
        else:
            raise DataError(f"{str(path)!r} is neither a folder nor a .zip or .tar archive; set data.root to one")

    def __getstate__(self):
        # Open handles do not cross into DataLoader workers; each worker reopens the archive.
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def _open(self):
        if self._handle is None or self._pid != os.getpid():
            if self.kind == "zip":
                self._handle = zipfile.ZipFile(self.path)
            elif self.kind == "tar":
                self._handle = tarfile.open(self.path)
            self._pid = os.getpid()
        return self._handle

    def list_folders(self) -> list[str]:
        """Relative paths of every folder in the source, so that empty folders are seen too."""
        if self.kind == "folder":
            return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_dir())
        if self.kind == "zip":
            names = [i.filename.rstrip("/") for i in self._open().infolist() if i.is_dir()]
        else:
            names = [m.name for m in self._open().getmembers() if m.isdir()]
        return sorted(n[2:] if n.startswith("./") else n for n in names if n not in ("", "."))

    def list_files(self) -> list[str]:
        if self.kind == "folder":
            return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
        if self.kind == "zip":
            return sorted(i.filename for i in self._open().infolist() if not i.is_dir())
        return sorted(m.name for m in self._open().getmembers() if m.isfile())

    def read(self, name: str) -> bytes:
        if self.kind == "folder":
            return (self.path / name).read_bytes()
        if self.kind == "zip":
            return self._open().read(name)
        handle = self._open()
        try:
            member = handle.getmember(name)
        except KeyError:
            # `tar -C folder .` stores names as ./train/..., but _scan_tree drops the leading ./
            member = handle.getmember(f"./{name}")
        return handle.extractfile(member).read()

    def fingerprint(self) -> str:
        """Hash of the source's identity and content listing (names, sizes, checksums or mtimes)."""
        digest = hashlib.sha256(str(self.path.resolve()).encode())
        if self.kind == "folder":
            digest.update(_folder_fingerprint(self.path).encode())
        elif self.kind == "zip":
            for info in sorted(self._open().infolist(), key=lambda i: i.filename):
                digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\n".encode())
        else:
            for member in sorted(self._open().getmembers(), key=lambda m: m.name):
                digest.update(f"{member.name}\0{member.size}\0{member.mtime}\n".encode())
        return digest.hexdigest()[:20]


def _folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode(data: bytes, image_size: int | None, channels: int, name: str) -> torch.Tensor:
    """Decode image bytes to uint8 (C, H, W), resized (shorter side, then centre crop) if needed."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image_size is not None and image.size != (image_size, image_size):
                w, h = image.size
                scale = image_size / min(w, h)
                image = image.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                                     Image.BILINEAR)
                w, h = image.size
                left, top = (w - image_size) // 2, (h - image_size) // 2
                image = image.crop((left, top, left + image_size, top + image_size))
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"image {name!r} cannot be decoded ({exc}); remove or replace the file") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _scan_tree(files: list[str], source_name: str, folders: list[str] = ()) -> tuple[str, dict[str, dict[str, list[str]]], int]:
    """Find the train and test split folders and group image files by class.

    Returns (prefix, {split: {class: [files]}}, number of skipped non-image files).
    """
    parts = [PurePosixPath(f).parts for f in files]
    prefix: tuple[str, ...] = ()
    # An archive often wraps the tree in one top-level folder; descend through it.
    while parts and not any(p[:1] == ("train",) for p in parts):
        tops = {p[0] for p in parts if len(p) > 1}
        if len(tops) != 1:
            break
        top = tops.pop()
        prefix += (top,)
        parts = [p[1:] for p in parts if p[0] == top and len(p) > 1]
    roots = {p[0] for p in parts if len(p) > 1}
    if "train" not in roots:
        raise DataError(f"{source_name!r} has no train/ folder; an imagefolder needs train/<class>/ and test/<class>/")
    test_name = None
    if "test" in roots:
        test_name = "test"
    elif "val" in roots:
        test_name = "val"
    if test_name is None:
        raise DataError(f"{source_name!r} has no test/ or val/ folder; add one with the same class folders as train/")
    tree: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    # Class folders with no files at all still count as classes, so they can be reported.
    for folder in folders:
        p = PurePosixPath(folder).parts
        if p[:len(prefix)] != prefix:
            continue
        p = p[len(prefix):]
        if len(p) == 2 and p[0] in ("train", test_name):
            tree["train" if p[0] == "train" else "test"].setdefault(p[1], [])
    skipped = 0
    for p in parts:
        if len(p) < 2 or p[0] not in ("train", test_name):
            continue
        split = "train" if p[0] == "train" else "test"
        if len(p) == 2:
            skipped += 1  # a file directly under train/ or test/, outside any class folder
            continue
        cls = p[1]
        bucket = tree[split].setdefault(cls, [])
        if PurePosixPath(p[-1]).suffix.lower() in IMAGE_EXTENSIONS:
            bucket.append("/".join(prefix + p))
        else:
            skipped += 1
    return "/".join(prefix), tree, skipped


def _read_class_order(path: str | None, found: list[str], source_name: str) -> list[str]:
    if path is None:
        return sorted(found)
    order_file = Path(path)
    if not order_file.is_file():
        raise DataError(f"class-order file {path!r} not found; set data.class_order to a file with one class per line")
    order = [line.strip() for line in order_file.read_text().splitlines() if line.strip()]
    if len(set(order)) != len(order):
        raise DataError(f"class-order file {path!r} lists a class twice; list each class folder once")
    if set(order) != set(found):
        missing = sorted(set(found) - set(order))[:5]
        extra = sorted(set(order) - set(found))[:5]
        raise DataError(
            f"class-order file {path!r} does not match the class folders of {source_name!r} "
            f"(folders not listed: {missing}, listed but absent: {extra}); list exactly the folder names"
        )
    return order


def default_cache_dir() -> Path:
    return Path(os.environ.get("CVDD_CACHE", Path.home() / ".cache" / "cvdd"))


def load_imagefolder(
    root: str | Path, class_order: str | None = None, image_size: int | None = None, channels: int = 3,
    cache_dir: str | Path | None = None, num_workers: int = 2,
) -> ImageDataset:
    """Read a class-per-folder tree with train/ and test/ (or val/) from a folder, .zip or .tar.

    Classes are in sorted folder-name order unless `class_order` names a file with one class
    per line. Files without an image extension are skipped and counted in one warning.

    Raises:
        DataError: missing root, no train/ or test/ folder, a class folder without images,
            or different class folders in train/ and test/.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder or archive {str(root)!r} not found; set data.root (or --data-root) to it")
    source = _Source(root)
    source_name = str(root)
    _, tree, skipped = _scan_tree(source.list_files(), source_name, source.list_folders())
    if skipped:
        log.warning("skipped %d files that are not images in %s", skipped, source_name)
    for split, classes in tree.items():
        for cls, files in classes.items():
            if not files:
                raise DataError(f"class folder {split}/{cls} in {source_name!r} contains no images; add images or remove it")
    if set(tree["train"]) != set(tree["test"]):
        only_train = sorted(set(tree["train"]) - set(tree["test"]))[:5]
        only_test = sorted(set(tree["test"]) - set(tree["train"]))[:5]
        raise DataError(
            f"train and test class folders differ in {source_name!r} (only in train: {only_train}, "
            f"only in test: {only_test}); give both splits the same classes"
        )
    class_names = _read_class_order(class_order, list(tree["train"]), source_name)
    if len(class_names) < 2:
        raise DataError(f"{source_name!r} has {len(class_names)} class folder; a classifier needs at least 2")

    def listing(split):
        names, labels = [], []
        for label, cls in enumerate(class_names):
            files = sorted(tree[split][cls])
            names += files
            labels += [label] * len(files)
        return names, torch.tensor(labels, dtype=torch.long)

    train_names, train_labels = listing("train")
    test_names, test_labels = listing("test")
    native = _decode(source.read(train_names[0]), None, channels, train_names[0]).shape[-1]
    size = image_size or native
    identity = hashlib.sha256(
        f"{source.fingerprint()}|{class_names}|{size}|{channels}|v{CACHE_VERSION}".encode()
    ).hexdigest()[:20]
    name = root.name.split(".")[0]

    if size > IN_MEMORY_MAX_SIZE:
        train = StreamSplit(_FileImages(source, train_names, size, channels), train_labels, num_workers)
        test = StreamSplit(_FileImages(source, test_names, size, channels), test_labels, num_workers)
        # NOTE: mean and std of streamed data come from a seeded sample of at most 2,000 train images.
        sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:2000]
        mean, std = _channel_stats(train.get(sample.tolist()))
        return ImageDataset(name, class_names, channels, size, mean, std, train, test, identity)

    cache_path = Path(cache_dir or default_cache_dir()) / f"{name}-{identity}.pt"
    if cache_path.is_file():
        log.info("reading decoded images from cache %s", cache_path)
        cached = torch.load(cache_path, weights_only=True)
    else:
        from tqdm.auto import tqdm

        log.info("decoding %d images from %s (cached afterwards)", len(train_names) + len(test_names), source_name)
        decoded = {}
        for split, names in (("train", train_names), ("test", test_names)):
            images = torch.empty((len(names), channels, size, size), dtype=torch.uint8)
            for i, file_name in enumerate(tqdm(names, desc=f"decode {split}", leave=False)):
                images[i] = _decode(source.read(file_name), size, channels, file_name)
            decoded[split] = images
        cached = {
            "train_images": decoded["train"], "train_labels": train_labels,
            "test_images": decoded["test"], "test_labels": test_labels,
        }
        atomic_torch_save(cached, cache_path)
    train = TensorSplit(cached["train_images"], cached["train_labels"])
    test = TensorSplit(cached["test_images"], cached["test_labels"])
    mean, std = _channel_stats(train.images)
    return ImageDataset(name, class_names, channels, size, mean, std, train, test, identity,
                        extra={"cache_path": str(cache_path)})


def load_dataset(cfg) -> ImageDataset:
    """Load the dataset that a :class:`cvdd.config.DataConfig` describes."""
    kind = cfg.dataset
    if kind == "digits":
        return load_digits_dataset()
    if cfg.root is None:
        raise DataError(f"dataset {kind!r} needs data.root (or --data-root): the folder or archive that contains it")
    root = Path(cfg.root).expanduser()
    if kind == "imagefolder":
        return load_imagefolder(root, cfg.class_order, cfg.image_size, cfg.channels, cfg.cache_dir, cfg.num_workers)
    if not root.is_dir() and not cfg.download:
        raise _missing(kind, root, "the folder itself")
    if cfg.download:
        root.mkdir(parents=True, exist_ok=True)
    if kind in ("cifar10", "cifar100"):
        return _load_cifar(kind, root, cfg.download)
    return _load_mnist_like(kind, root, cfg.download)


def sample_per_class(labels: torch.Tensor, num_classes: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Return `per_class` distinct indices of each class, chosen with `generator`, shape (num_classes, per_class).

    Raises:
        DataError: if a class has fewer than `per_class` examples.
    """
    rows = []
    for label in range(num_classes):
        candidates = torch.nonzero(labels == label).flatten()
        if len(candidates) < per_class:
            raise DataError(
                f"class {label} has {len(candidates)} images but {per_class} per class were requested; "
                f"lower the IPC to at most {len(candidates)} or use noise initialisation"
            )
        rows.append(candidates[torch.randperm(len(candidates), generator=generator)[:per_class]])
    return torch.stack(rows)


class SubsetSplit(Split):
    """A view of some rows of another split (for example the 80/20 split of Algorithm 1)."""

    def __init__(self, base: Split, indices: torch.Tensor):
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.labels = base.labels[self.indices]

    def get(self, indices):
        return self.base.get(self.indices[torch.as_tensor(indices, dtype=torch.long)].tolist())

    def batches(self, batch_size, shuffle=False, generator=None, drop_last=False, indices=None):
        rows = self.indices if indices is None else self.indices[torch.as_tensor(indices, dtype=torch.long)]
        return self.base.batches(batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                                 indices=rows)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices per class into a `fraction` part and the rest, with `seed`; both sorted."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        cut = int(round(len(rows) * fraction))
        first.append(rows[:cut])
        second.append(rows[cut:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(second)).values
