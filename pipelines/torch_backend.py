"""The `torch` backend: DataLoader + torchvision functional transforms, for users without DALI (macOS, ...).

Random parameters come from a per-sample generator seeded by (epoch seed, sample index), so the result does
not depend on the number of workers and windows are known exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.utils.data
from torchvision.transforms.v2 import functional as TF

from .batch import Batch, LoaderConfig, ShardedSource, epoch_order
from .datasets import FOLDER_IMAGE_SIZE, ArrayDataset, BadFile, CorruptImage, FolderDataset, describe_bad_files
from .statistics import resolve_stats


def random_resized_crop_params(
    height: int, width: int, area: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `generator`: (top, left, h, w) in px."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = height * width * float(torch.empty(1).uniform_(area[0], area[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # Fallback: the whole image, clipped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Samples(torch.utils.data.Dataset):
    """One sample: (image (C, H, W) float normalised, label, index, window (4,), flip)."""

    def __init__(self, dataset, view: str, config: LoaderConfig):
        self.dataset, self.view, self.config = dataset, view, config
        mean, std = resolve_stats(dataset, config)
        self.mean, self.std = list(mean), list(std)
        self.epoch_seed = config.epoch_seed(0)
        self.is_folder = isinstance(dataset, FolderDataset)
        self.size = (
            config.image_size if config.image_size is not None else (FOLDER_IMAGE_SIZE if self.is_folder else None)
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int) -> torch.Tensor:
        if not self.is_folder:
            return self.dataset.images[index].permute(2, 0, 1)  # (C, H, W) uint8
        import numpy as np
        from PIL import Image

        path = self.dataset.paths[index]
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        except Exception as err:  # noqa: BLE001 - any decoder failure names the file
            return BadFile(path, f"{type(err).__name__}: {err}", self.dataset.files[index])
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W)

    def __getitem__(self, index: int):
        image = self._load(index)
        if isinstance(image, BadFile):  # reported by the main process, not as a worker's traceback
            return image
        _, H, W = image.shape
        generator = torch.Generator().manual_seed(self.epoch_seed * 7919 + index)
        flip = False
        if self.view == "train" and self.is_folder:
            top, left, h, w = random_resized_crop_params(H, W, self.config.crop_area, self.config.crop_ratio, generator)
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
            window = (top / H, left / W, (top + h) / H, (left + w) / W)
        elif self.view == "train":
            pad = self.config.pad
            dy = int(torch.randint(0, 2 * pad + 1, (1,), generator=generator)) - pad
            dx = int(torch.randint(0, 2 * pad + 1, (1,), generator=generator)) - pad
            # Crop at (dy, dx) from the black-padded image: TF.crop pads where the box leaves the image.
            image = TF.crop(image, dy, dx, H, W)
            window = (dy / H, dx / W, (dy + H) / H, (dx + W) / W)
        elif self.view == "val" and self.is_folder:
            short = round(self.size * self.config.val_resize)
            image = TF.resize(image, short, antialias=True)
            _, h, w = image.shape
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
            image = TF.crop(image, top, left, self.size, self.size)
            window = (top / h, left / w, (top + self.size) / h, (left + self.size) / w)
        else:  # refresh (and val for arrays): the whole image, squashed to the output size
            window = (0.0, 0.0, 1.0, 1.0)
        if self.view == "train" and self.config.flip:
            flip = bool(torch.rand(1, generator=generator) < 0.5)
            if flip:
                image = image.flip(-1)
        if self.size is not None and tuple(image.shape[-2:]) != (self.size, self.size):
            image = TF.resize(image, [self.size, self.size], antialias=True)
        image = TF.normalize(image.float() / 255, self.mean, self.std)
        return image, int(self.dataset.labels[index]), index, torch.tensor(window, dtype=torch.float32), flip


class _Unreadable(NamedTuple):
    files: list[BadFile]  # the files of one batch that do not decode


def _collate(samples: list) -> list | _Unreadable:
    """The default collation, or the batch's undecodable files when it has any."""
    bad = [s for s in samples if isinstance(s, BadFile)]
    return _Unreadable(bad) if bad else torch.utils.data.default_collate(samples)


class TorchSource(ShardedSource):
    def __init__(self, dataset: ArrayDataset | FolderDataset, view: str, config: LoaderConfig):
        super().__init__(len(dataset), view, config)
        self.samples = _Samples(dataset, view, config)
        self.device = torch.device(config.device)

    def __iter__(self) -> Iterator[Batch]:
        seed = self.config.epoch_seed(self.epoch)
        self.samples.epoch_seed = seed
        order = epoch_order(self.shard, self.view, torch.Generator().manual_seed(seed))
        loader = torch.utils.data.DataLoader(
            self.samples,
            batch_size=self.config.batch_size,
            sampler=order.tolist(),
            num_workers=self.config.num_threads,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            collate_fn=_collate,
        )
        half = self.config.half and self.device.type == "cuda"
        for collated in loader:
            if isinstance(collated, _Unreadable):
                raise CorruptImage(self.samples.dataset.name, f"cannot decode {describe_bad_files(collated.files)}")
            images, labels, indices, windows, flips = collated
            images = images.to(self.device, non_blocking=True)
            yield Batch(
                images.half() if half else images,
                labels.to(self.device),
                indices.to(self.device),
                windows.to(self.device),
                flips.to(self.device),
            )
