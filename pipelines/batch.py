"""The one output contract every backend (dali, tensor, torch) honours, and the loader's config."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from gutout.config import ConfigError, check_choice, check_types

BACKENDS = ("dali", "tensor", "torch")
VIEWS = ("train", "val", "refresh")


class Batch(NamedTuple):
    images: torch.Tensor  # (B, C, H, W) float, normalised with mean/std; float16 allowed on CUDA
    labels: torch.Tensor  # (B,) int64 class labels
    indices: torch.Tensor  # (B,) int64 position of each sample in the dataset (the cache's index)
    windows: torch.Tensor  # (B, 4) float32 crop window (y0, x0, y1, x1) in the canonical frame
    flips: torch.Tensor  # (B,) bool, horizontal flip applied after the crop
    clean: torch.Tensor | None = None  # (B, C, H, W) the images before the cut, when the caller asked to keep them


class ShardedSource:
    """What every backend's BatchSource shares: this process's shard of the dataset, `len()` batches per epoch
    (the last one partial), and the epoch that seeds the order and the augmentation."""

    def __init__(self, samples: int, view: str, config: LoaderConfig):
        self.view, self.config = view, config
        start, stop = shard_range(samples, config.shard_id, config.num_shards)
        self.shard = torch.arange(start, stop)  # (n,) int64 dataset positions this process reads
        self.epoch = 0

    def __len__(self) -> int:
        return batches_per_epoch(self.shard.numel(), self.config.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


# A stage's `normalise_and_cut`: (source uint8 (n, C, S, S), out float32, mean (C,), std (C,), indices, windows,
# flips) -> out, normalised and cut; mean and std in uint8 pixel units.
NormaliseAndCut = Callable[..., torch.Tensor]


class HostNormalisingSource:
    """A source whose batches are normalised on the host (uint8 to float32), which can hand that pass to a stage:
    `normalised_epoch(normalise_and_cut)` yields the epoch's batches normalised and cut in one pass, so the cut
    costs no pass of its own. The loader recognises such a source by this type."""

    def normalised_epoch(self, normalise_and_cut: NormaliseAndCut) -> Iterator[Batch]:
        raise NotImplementedError


class BatchSource(Protocol):
    """A backend's iterable over one view of one dataset shard, `len()` batches per epoch."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class LoaderConfig:
    # 128 rather than 256: twice the steps per epoch; the small ResNet on full Fashion-MNIST, 4 epochs, no cut:
    # 89.6 % test accuracy at 256, 90.2 % at 128.
    batch_size: int = 128
    image_size: int | None = None  # output side in px; None: the dataset's own (arrays) or FOLDER_IMAGE_SIZE
    mean: tuple[float, ...] | None = None  # [0, 1] pixel units; None: the dataset's own statistics
    std: tuple[float, ...] | None = None
    pad: int = 4  # arrays: pad-and-crop padding in px (windows then reach outside [0, 1])
    crop_area: tuple[float, float] = (0.08, 1.0)  # folders: random-resized-crop area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # folders: aspect ratio range
    flip: bool = True
    val_resize: float = 256 / 224  # folders: shorter side = image_size * val_resize, then centre crop
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"  # "auto": tensor for arrays, dali for image folders where it imports, else torch
    num_threads: int = 2  # DALI threads / DataLoader workers
    shard_id: int = 0  # this process's shard of the dataset (multi-process training)
    num_shards: int = 1
    half: bool = False  # float16 images (GPU pipelines)
    # DALI without a GPU: who resizes the train crops. "torch" (on the host, ~4x faster than DALI's CPU resize,
    # and the stage then cuts in the normalising pass) or "dali" (the whole graph in DALI).
    cpu_resize: str = "torch"
    # DALI without a GPU: torch threads of the host finishing pass (resize, normalise, cut), which runs while DALI's
    # threads decode the next batches. None: the cores DALI's threads leave, at least 1, so the two do not compete
    # for cores (bench/loader.py measures both); 0: torch's own setting.
    host_threads: int | None = None

    def __post_init__(self):
        check_types(self)
        name = "LoaderConfig"
        check_choice(name, "backend", self.backend, ("auto", *BACKENDS))
        check_choice(name, "cpu_resize", self.cpu_resize, ("torch", "dali"))
        if self.batch_size < 1:
            raise ConfigError(f"{name}.batch_size={self.batch_size} must be >= 1")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"{name}.image_size={self.image_size} must be >= 1")
        if self.host_threads is not None and self.host_threads < 0:
            raise ConfigError(f"{name}.host_threads={self.host_threads} must be >= 0 (0: torch's own setting)")
        if self.pad < 0:
            raise ConfigError(f"{name}.pad={self.pad} must be >= 0")
        lo, hi = self.crop_area
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{name}.crop_area={self.crop_area} must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ConfigError(f"{name}.crop_ratio={self.crop_ratio} must satisfy 0 < lo <= hi")
        if not 0 <= self.shard_id < self.num_shards:
            raise ConfigError(f"{name}.shard_id={self.shard_id} must lie in [0, num_shards={self.num_shards})")
        if (self.mean is None) != (self.std is None):
            raise ConfigError(f"{name}: give both mean and std, or neither")

    def epoch_seed(self, epoch: int, salt: int = 0) -> int:
        """Seed for one epoch of one shard: runs are reproducible and shards draw different numbers."""
        return (self.seed * 1_000_003 + epoch * 10_007 + self.shard_id * 101 + salt) % (2**31 - 1)


def shard_range(samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of a shard, as DALI's readers split a dataset (contiguous, sizes differ by <= 1)."""
    start = samples * shard_id // num_shards
    stop = samples * (shard_id + 1) // num_shards
    return start, stop


def epoch_order(shard: torch.Tensor, view: str, generator: torch.Generator) -> torch.Tensor:
    """The samples of one epoch, in order: the shard permuted by `generator` for `train`, as is otherwise.

    Every backend draws its order here, from a generator seeded with `LoaderConfig.epoch_seed(epoch)`, so all
    three visit the same samples in the same order.
    """
    if view != "train":
        return shard
    return shard[torch.randperm(len(shard), generator=generator)]


def batches_per_epoch(samples: int, batch_size: int) -> int:
    return math.ceil(samples / batch_size)
