"""Datasets as plain data: in-memory uint8 arrays (Fashion-MNIST, CIFAR) or ordered file lists (ImageFolder).

Both carry a fingerprint (sample count + hash of the ordered samples and labels) for the saliency cache.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gutout.fingerprint import dataset_fingerprint

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DatasetError(ValueError):
    """A dataset cannot be found or read; the message names the path or file."""


def class_labels(labels, classes: int | None, name: str = "arrays") -> torch.Tensor:
    """Labels as int64 (N,): an integer dtype, or floats that are whole numbers, each in [0, classes) (when
    `classes` is None, only >= 0). Anything else is an error naming the first bad sample and value."""
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.is_floating_point():
        bad = (~torch.isfinite(labels) | (labels != labels.round())).nonzero()
        if len(bad):
            i = int(bad[0])
            raise DatasetError(f"{name}: labels must be whole class numbers; label {i} is {labels[i].item():g}")
    elif labels.dtype == torch.bool or labels.is_complex():
        raise DatasetError(f"{name}: labels must be integer class numbers, got dtype {labels.dtype}")
    labels = labels.long()
    outside = labels < 0
    if classes is not None:
        outside |= labels >= classes
    bad = outside.nonzero()
    if len(bad):
        i = int(bad[0])
        allowed = f"[0, {classes}) ({classes} classes)" if classes is not None else "0 or more"
        raise DatasetError(f"{name}: label {i} is {int(labels[i])}; labels must lie in {allowed}")
    return labels


@dataclass
class ArrayDataset:
    """Images held in memory: uint8 (N, H, W, C), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = "arrays"
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.images.dtype != torch.uint8:
            raise DatasetError(f"{self.name}: images must be uint8, got {self.images.dtype}")
        if self.images.dim() == 3:
            self.images = self.images[..., None]  # (N, H, W) -> (N, H, W, 1)
        if self.images.dim() != 4:
            raise DatasetError(f"{self.name}: images must be (N, H, W[, C]), got {tuple(self.images.shape)}")
        if self.images.shape[0] == 0:
            raise DatasetError(f"{self.name}: the arrays hold no samples")
        self.labels = class_labels(self.labels, len(self.classes), self.name)
        if self.labels.numel() != self.images.shape[0]:
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but {self.labels.numel()} labels")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = dataset_fingerprint(self.images, self.labels)
        return self._fingerprint

    def subset(self, indices: torch.Tensor, tag: str = "subset") -> ArrayDataset:
        indices = torch.as_tensor(indices).long()
        return ArrayDataset(self.images[indices], self.labels[indices], self.classes, f"{self.name}[{tag}]")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"cannot read {path}: {err}") from None
    if len(data) < 4:
        raise DatasetError(f"{path} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path} is not a uint8 idx file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: {body.size} of {int(np.prod(shape))} values")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / "FashionMNIST" / "raw" / stem):
        if candidate.exists():
            return candidate
    return None


def fashion_mnist_folder(data: str | os.PathLike | None = None) -> Path:
    """Where the idx files are: `data`, else Debian's dataset-fashion-mnist, else torchvision's download."""
    if data is not None:
        folder = Path(data)
        if not folder.exists():
            raise DatasetError(f"fashion-mnist: --data {folder} does not exist")
        if _find_idx(folder, FASHION_MNIST_FILES["train"][0]) is None:
            raise DatasetError(f"fashion-mnist: no {FASHION_MNIST_FILES['train'][0]}[.gz] under {folder}")
        return folder
    if _find_idx(DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES["train"][0]) is not None:
        return DEBIAN_FASHION_MNIST
    cache = Path(os.environ.get("GUTOUT_DATA", Path.home() / ".cache" / "gutout"))
    if _find_idx(cache, FASHION_MNIST_FILES["train"][0]) is None:
        try:
            import torchvision

            torchvision.datasets.FashionMNIST(cache, train=True, download=True)
            torchvision.datasets.FashionMNIST(cache, train=False, download=True)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise DatasetError(
                "fashion-mnist: not found. Install Debian's package (apt-get install dataset-fashion-mnist), "
                f"or pass --data DIR holding the idx files; the download into {cache} failed: {err}"
            ) from None
    return cache


def load_fashion_mnist(split: str = "train", data: str | os.PathLike | None = None) -> ArrayDataset:
    folder = fashion_mnist_folder(data)
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    images = torch.from_numpy(_read_idx(_find_idx(folder, image_stem)).copy())  # (N, 28, 28)
    labels = torch.from_numpy(_read_idx(_find_idx(folder, label_stem)).astype(np.int64))
    return ArrayDataset(images, labels, FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")


def load_cifar(name: str, split: str, data: str | os.PathLike) -> ArrayDataset:
    """The official python-pickle CIFAR-10/100 folder (cifar-10-batches-py / cifar-100-python)."""
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"{name}: --data {root} does not exist")
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta, names_key = b"labels", "batches.meta", b"label_names"
    else:
        files = ["train"] if split == "train" else ["test"]
        label_key, meta, names_key = b"fine_labels", "meta", b"fine_label_names"
    # The folder itself, or the archive's folder inside it: the first that holds the split's first file.
    candidates = (root, root / "cifar-10-batches-py", root / "cifar-100-python")
    folder = next((p for p in candidates if (p / files[0]).is_file()), root)
    images, labels = [], []
    for file in files:
        path = folder / file
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
        except (OSError, pickle.UnpicklingError, EOFError) as err:
            raise DatasetError(f"{name}: cannot read {path}: {err}") from None
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch[label_key])
    try:
        with open(folder / meta, "rb") as f:
            classes = tuple(c.decode() for c in pickle.load(f, encoding="bytes")[names_key])
    except OSError:
        classes = tuple(str(i) for i in range(max(labels) + 1))
    return ArrayDataset(torch.from_numpy(np.concatenate(images)), torch.tensor(labels), classes, f"{name}/{split}")


def stratified_split(
    labels: torch.Tensor, held_out: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, rest) sorted sample positions: `held_out` samples drawn at random within each class, each class
    contributing in proportion to its size (largest remainders settle the rounding)."""
    labels = torch.as_tensor(labels).long()
    n = labels.numel()
    if not 0 <= held_out < n:
        raise DatasetError(f"cannot hold out {held_out} of {n} samples (keep at least one for training)")
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * held_out / n  # (classes,) exact shares
    take = quota.floor().long()
    short = held_out - int(take.sum())
    take[(quota - take).argsort(descending=True, stable=True)[:short]] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = (labels == c).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.cat(chosen)] = True
    return mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class FolderDataset:
    """An ImageFolder layout (`root/<class>/<image>`): ordered relative file paths and their labels."""

    root: Path
    files: list[str]  # relative to root, ordered by class then file name: the cache's sample order
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    name: str = "folder"
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def channels(self) -> int:
        return 3

    @property
    def paths(self) -> list[str]:
        return [str(self.root / f) for f in self.files]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = dataset_fingerprint(self.files, self.labels)
        return self._fingerprint

    def subset(self, indices: torch.Tensor, tag: str = "subset") -> FolderDataset:
        indices = torch.as_tensor(indices).long()
        files = [self.files[i] for i in indices.tolist()]
        return FolderDataset(self.root, files, self.labels[indices], self.classes, f"{self.name}[{tag}]")

    def without(self, bad_files: list[str]) -> FolderDataset:
        """The dataset minus files (names relative to the root, as in `files`), order otherwise kept."""
        bad = set(bad_files)
        keep = [i for i, f in enumerate(self.files) if f not in bad]
        return FolderDataset(self.root, [self.files[i] for i in keep], self.labels[keep], self.classes, self.name)


def scan_folder(root: str | os.PathLike, name: str = "folder") -> FolderDataset:
    """List an ImageFolder tree; a missing root, no class folders or an empty class folder is an error."""
    dataset, problems = survey_folder(root, name)
    if problems:
        raise DatasetError(f"{name}: {problems[0]}")
    return dataset


def survey_folder(root: str | os.PathLike, name: str = "folder") -> tuple[FolderDataset | None, list[str]]:
    """An ImageFolder tree's files, and every structural problem that makes it unusable (each a sentence naming
    the path): a missing root, no class folders, class folders without images."""
    root = Path(root)
    if not root.exists():
        return None, [f"{root} does not exist"]
    if not root.is_dir():
        return None, [f"{root} is not a folder"]
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        return None, [f"no class folders under {root} (expected {root}/<class>/<image>)"]
    files, labels, problems = [], [], []
    for label, cls in enumerate(classes):
        images = sorted(
            str(p.relative_to(root))
            for p in (root / cls).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            problems.append(f"class folder {root / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(images)
        labels.extend([label] * len(images))
    return FolderDataset(root, files, torch.tensor(labels, dtype=torch.int64), tuple(classes), name), problems


def class_mismatch(train: FolderDataset, val: FolderDataset) -> str | None:
    """Why two splits cannot share labels (each numbers its own sorted class folders), or None."""
    if val.classes == train.classes:
        return None
    missing = sorted(set(train.classes) - set(val.classes))
    extra = sorted(set(val.classes) - set(train.classes))
    return (
        f"{val.root} and {train.root} must hold the same class folders "
        f"(missing from val: {missing or 'none'}; only in val: {extra or 'none'})"
    )


class CorruptImage(DatasetError):
    """Image files that do not decode, named; `message(option)` words the way out in the caller's spelling."""

    def __init__(self, dataset: str, problem: str):
        self.dataset, self.problem = dataset, problem
        super().__init__(self.message())

    def message(self, option: str = "skip_corrupt=True") -> str:
        return (
            f"{self.dataset}: {self.problem}: remove it, or leave such files out with {option} "
            "(`gutout check` lists every bad file)"
        )


@dataclass(frozen=True)
class BadFile:
    path: str  # where it was read (root / file)
    reason: str
    file: str  # its name relative to the dataset root, as in FolderDataset.files


def _check_one(path: str, file: str) -> BadFile | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes everything: truncation shows here, not in verify()
            if image.width < 1 or image.height < 1:
                return BadFile(path, "empty image", file)
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the file bad
        return BadFile(path, f"{type(err).__name__}: {err}", file)
    return None


def describe_bad_files(bad: list[BadFile], limit: int = 5) -> str:
    """The first `limit` bad files with their reasons, and how many more there are."""
    named = "; ".join(f"{b.path} ({b.reason})" for b in bad[:limit])
    return named + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def check_images(dataset: FolderDataset, workers: int = 2) -> list[BadFile]:
    """Decode every file once; the files that fail, with the decoder's reason."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checked = pool.map(_check_one, dataset.paths, dataset.files, chunksize=64)
        return [bad for bad in checked if bad is not None]


def content_digest(datasets: list[FolderDataset]) -> str:
    """SHA-256 over every file's relative name and bytes, in dataset order: identity of content, which the cache's
    fingerprint (names and labels) does not cover."""
    import hashlib

    digest = hashlib.sha256()
    for dataset in datasets:
        for file, path in zip(dataset.files, dataset.paths, strict=True):
            digest.update(file.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def load_folder(root: str | os.PathLike, *, skip_corrupt: bool = False, name: str = "folder") -> FolderDataset:
    """An ImageFolder dataset; with `skip_corrupt`, files that fail to decode are listed and left out."""
    dataset = scan_folder(root, name)
    if skip_corrupt:
        bad = check_images(dataset)
        for b in bad:
            print(f"skipping corrupt file {b.path}: {b.reason}")
        dataset = dataset.without([b.file for b in bad])
        if len(dataset) == 0:
            raise DatasetError(f"{name}: every file under {root} failed to decode")
    return dataset


def _load_folder_split(name: str, split: str, data: str | os.PathLike, skip_corrupt: bool) -> FolderDataset:
    """An ImageFolder root's `train/` or (for the test split) `val/`."""
    return load_folder(Path(data) / ("train" if split == "train" else "val"), skip_corrupt=skip_corrupt, name=name)


FOLDER_IMAGE_SIZE = 224  # the output side of image folders unless the caller sets one (ImageNet's convention)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset `gutout train` knows. Adding a dataset is one record here (and its loader function)."""

    name: str
    # (split "train" or "test", --data or None, skip_corrupt) -> the split
    load: Callable[[str, str | os.PathLike | None, bool], ArrayDataset | FolderDataset]
    mean: tuple[float, ...]  # per-channel statistics in [0, 1] pixel units (torchvision's convention)
    std: tuple[float, ...]
    cutout_side: float  # Cutout's square, a fraction of the image side (DeVries & Taylor 2017: 16/32 on CIFAR-10)
    image_size: int | None = None  # the training side; None: the arrays' own
    needs_data: bool = True  # --data is required (no copy on the machine to fall back to)
    default_model: str = "small-resnet"  # for 28-32 px images; ImageNet-sized ones take a torchvision ResNet

    def split(self, split: str, data: str | os.PathLike | None = None, skip_corrupt: bool = False):
        if self.needs_data and data is None:
            raise DatasetError(f"dataset {self.name!r} needs --data PATH")
        return self.load(split, data, skip_corrupt)


DATASETS = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "fashion-mnist",
            lambda split, data, _: load_fashion_mnist(split, data),
            (0.2860,),
            (0.3530,),
            cutout_side=0.5,
            needs_data=False,
        ),  # the paper has no Fashion-MNIST side: CIFAR-10's half
        DatasetSpec(
            "cifar10",
            lambda split, data, _: load_cifar("cifar10", split, data),
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
            cutout_side=0.5,
        ),
        DatasetSpec(
            "cifar100",
            lambda split, data, _: load_cifar("cifar100", split, data),
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
            cutout_side=0.25,
        ),
        DatasetSpec(
            "imagenet",
            lambda split, data, skip: _load_folder_split("imagenet", split, data, skip),
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
            cutout_side=0.5,
            image_size=FOLDER_IMAGE_SIZE,
            default_model="resnet18",
        ),
        DatasetSpec(
            "folder",
            lambda split, data, skip: _load_folder_split("folder", split, data, skip),
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
            cutout_side=0.5,
            image_size=FOLDER_IMAGE_SIZE,
            default_model="resnet18",
        ),  # any ImageFolder root: ImageNet's statistics
    ]
}
STATS = {name: (spec.mean, spec.std) for name, spec in DATASETS.items()}


def registered(dataset) -> DatasetSpec | None:
    """The record of a dataset loaded through the registry (its name starts with the record's: `cifar10/train`,
    `fashion-mnist/train[subset]`), or None."""
    family = dataset.name.split("/")[0].split("[")[0]
    return DATASETS.get(family)
