"""The `tensor` backend: the dataset lives on the device as uint8; augmentation is batched tensor ops.

As airbench does: one gather per batch does pad-and-crop and flip together (indices built by broadcasting,
no per-sample Python loop). This is the fast path for small in-memory datasets, and the path a GPU machine
without DALI runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .batch import Batch, LoaderConfig, ShardedSource, epoch_order
from .datasets import ArrayDataset, DatasetError
from .statistics import resolve_stats


class TensorArraySource(ShardedSource):
    def __init__(self, dataset: ArrayDataset, view: str, config: LoaderConfig):
        if not isinstance(dataset, ArrayDataset):
            raise DatasetError(
                f"the tensor backend holds the dataset in memory and takes arrays, got {type(dataset).__name__}; "
                "use backend='dali' or 'torch' for image folders"
            )
        super().__init__(len(dataset), view, config)
        self.device = torch.device(config.device)
        self.images = dataset.images.permute(0, 3, 1, 2).contiguous().to(self.device)  # (N, C, H, W) uint8
        self.labels = dataset.labels.to(self.device)
        mean, std = resolve_stats(dataset, config)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255  # uint8 units
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.dtype = torch.float16 if config.half and self.device.type == "cuda" else torch.float32

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.config.epoch_seed(self.epoch))
        order = epoch_order(self.shard, self.view, generator)  # then crops and flips from the same stream
        for start in range(0, len(order), self.config.batch_size):
            indices = order[start : start + self.config.batch_size]
            yield self._batch(indices, generator)

    def _batch(self, indices: torch.Tensor, generator: torch.Generator) -> Batch:
        B = len(indices)
        _, C, H, W = self.images.shape
        idx = indices.to(self.device)
        if self.view == "train":
            images, windows, flips = self._pad_crop_flip(idx, generator)
        else:
            images = self.images[idx]  # (B, C, H, W) uint8
            windows = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=self.device).expand(B, 4)
            flips = torch.zeros(B, dtype=torch.bool, device=self.device)
        images = (images.to(self.dtype) - self.mean.to(self.dtype)) / self.std.to(self.dtype)
        size = self.config.image_size
        if size is not None and (H, W) != (size, size):
            # Resizing keeps every window: the crop (or the whole image for val/refresh) fills the output.
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return Batch(images, self.labels[idx], idx, windows.contiguous(), flips)

    def _pad_crop_flip(self, idx: torch.Tensor, generator: torch.Generator):
        """Pad by `pad` px of black (0 before normalisation, as torchvision's RandomCrop), crop back to H x W
        at a random offset, flip half; one gather for the whole batch."""
        B = len(idx)
        _, C, H, W = self.images.shape
        pad = self.config.pad
        dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator) - pad  # crop top - image top, in px
        dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator) - pad
        flips = torch.rand(B, generator=generator) < 0.5 if self.config.flip else torch.zeros(B, dtype=torch.bool)
        rows = dy[:, None] + torch.arange(H)  # (B, H) source row of each output row
        cols = dx[:, None] + torch.arange(W)  # (B, W) source column of each crop column
        cols = torch.where(flips[:, None], cols.flip(1), cols)  # the flip comes after the crop
        inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # (B, H, W)
        rows, cols, inside = (t.to(self.device) for t in (rows.clamp(0, H - 1), cols.clamp(0, W - 1), inside))
        hwc = self.images.permute(0, 2, 3, 1)  # (N, H, W, C) view, no copy
        images = hwc[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C) uint8
        images = (images * inside[..., None]).permute(0, 3, 1, 2)  # padding is black
        windows = torch.stack([dy / H, dx / W, (dy + H) / H, (dx + W) / W], dim=1).float()  # (B, 4)
        return images, windows.to(self.device), flips.to(self.device)
