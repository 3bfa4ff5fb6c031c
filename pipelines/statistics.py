"""Normalisation statistics: the user's, else the registered dataset's, else measured on the arrays, else
ImageNet's."""

from __future__ import annotations

import torch

from .batch import LoaderConfig
from .datasets import DATASETS, ArrayDataset, registered


def resolve_stats(dataset, config: LoaderConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) in [0, 1] pixel units, one value per channel of `dataset`."""
    spec = registered(dataset)
    if config.mean is not None:
        mean, std = tuple(config.mean), tuple(config.std)
    elif spec is not None:
        mean, std = spec.mean, spec.std
    elif isinstance(dataset, ArrayDataset):
        mean, std = measured_stats(dataset.images)
    else:
        mean, std = DATASETS["imagenet"].mean, DATASETS["imagenet"].std
    channels = dataset.channels
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values but {dataset.name} has {channels} channels")
    return mean, std


def measured_stats(images: torch.Tensor, limit: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of uint8 images (N, H, W, C), from up to `limit` images."""
    sample = images[:limit].double() / 255
    mean = sample.mean(dim=(0, 1, 2))
    std = sample.std(dim=(0, 1, 2)).clamp_min(1e-3)  # a constant image would divide by zero
    return tuple(mean.tolist()), tuple(std.tolist())
