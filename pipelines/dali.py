"""DALI backend: decode and augment with NVIDIA DALI (GPU "mixed" decoding on CUDA, CPU operators without one).

Every view yields `pipelines.batch.Batch` records whose crop windows follow the canonical-frame contract of
docs/design.md: a window is the region of the whole source image, in [0, 1] units, that the output pixels cover.

How an epoch runs: the epoch's sample order (this shard's indices, permuted from `config.epoch_seed(epoch)`
for `train`, in order otherwise) is fixed in Python, and a fresh pipeline is built for it (a few ms; the
first in a process ~0.2 s). That makes epoch e reproducible on its own (a resumed run sees the same crops as
an uninterrupted one) and the shuffle a full permutation, where DALI's `random_shuffle` only mixes within a
buffer of `initial_fill` (1024) samples of a class-sorted ImageFolder list. The reader gets exactly this
shard's files (`shard_range`, as every backend splits) with the sample index as its label, and
`pad_last_batch=True`, so no sample leaks from one epoch into the next; the padded tail is cut off here.
The permutation is the one the tensor backend draws (`randperm` from `epoch_seed(epoch)`), so both backends
visit samples in the same order.

`nvidia.dali` is imported inside functions only: `gutout.pipelines` must import on machines without DALI.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gutout.config import ConfigError, check_choice

from .batch import VIEWS, Batch, HostNormalisingSource, LoaderConfig, NormaliseAndCut, ShardedSource, epoch_order
from .datasets import (
    FOLDER_IMAGE_SIZE,
    ArrayDataset,
    CorruptImage,
    DatasetError,
    FolderDataset,
    check_images,
    describe_bad_files,
)
from .host_finish import HostFinish, host_thread_limit, torch_threads
from .statistics import resolve_stats

READER = "Reader"
PREFETCH = 2  # DALI's prefetch queue depth: a decode error may surface up to this many batches early
_FULL_WINDOW = (0.0, 0.0, 1.0, 1.0)
_SALT_PERMUTATION, _SALT_AUGMENT = 0, 1


# -- configuration shared by both sources -------------------------------------------------------------


def dali_device(config: LoaderConfig) -> tuple[torch.device, int | None]:
    """(torch device of the outputs, DALI device_id): None runs CPU operators only (no GPU needed)."""
    device = torch.device(config.device)
    if device.type == "cpu":
        return device, None
    if device.type != "cuda":
        raise ConfigError(f"the dali backend runs on 'cpu' or 'cuda', not {config.device!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"LoaderConfig.device={config.device!r} but CUDA is not available")
    index = torch.cuda.current_device() if device.index is None else device.index
    return torch.device("cuda", index), index


def _to_torch(output: Any, device: torch.device) -> torch.Tensor:
    """A DALI output batch as a torch tensor: a zero-copy DLPack view (the dynamic executor hands
    each batch its own buffer, so the view stays valid after the next run)."""
    with device:
        return torch.from_dlpack(output.as_tensor())


def _dali_reason(err: Exception) -> str:
    """The operator's own message out of DALI's wrapper text ("Critical error ... encountered: <why>")."""
    text = str(err)
    found = re.search(r"encountered:\s*(.*?)\s*(?:Current pipeline object is no longer valid|$)", text, re.S)
    reason = found.group(1) if found else text
    return " ".join(reason.split())[:500]


# -- the epoch loop both sources share ------------------------------------------------------------------


class _DaliSource(ShardedSource):
    """One view of one dataset shard as a `BatchSource`: `len()` batches per epoch, the last one partial."""

    def __init__(self, dataset: FolderDataset | ArrayDataset, view: str, config: LoaderConfig):
        check_choice("dali source", "view", view, VIEWS)
        super().__init__(len(dataset), view, config)
        self.dataset = dataset
        self.device, self.device_id = dali_device(config)
        self.mean, self.std = resolve_stats(dataset, config)  # [0, 1] units, as every backend resolves them
        self.labels = dataset.labels.to(self.device)
        self.out_dtype = torch.float16 if (config.half and self.device.type == "cuda") else torch.float32

    def epoch_order(self) -> torch.Tensor:
        """This epoch's sample order (n,) int64: a seeded permutation of the shard for `train`."""
        generator = torch.Generator().manual_seed(self.config.epoch_seed(self.epoch, _SALT_PERMUTATION))
        return epoch_order(self.shard, self.view, generator)

    def _depth(self) -> int:
        return max(1, min(PREFETCH, len(self)))  # an epoch of one batch must not decode a second

    def _dali_type(self):
        from nvidia.dali import types

        return types.FLOAT16 if self.out_dtype == torch.float16 else types.FLOAT

    def _pipeline_kwargs(self) -> dict[str, Any]:
        return dict(
            batch_size=self.config.batch_size,
            num_threads=max(1, self.config.num_threads),  # 0 means "no workers" to DataLoader; DALI needs one
            device_id=self.device_id,
            seed=self.config.epoch_seed(self.epoch, _SALT_AUGMENT),
            prefetch_queue_depth=self._depth(),
            exec_dynamic=True,  # outputs own their buffers: the zero-copy views in _to_torch rely on it
        )

    def _build(self, order: torch.Tensor):
        raise NotImplementedError

    def _batch(
        self, outputs: tuple, start: int, batch_order: torch.Tensor, normalise_and_cut: NormaliseAndCut | None
    ) -> Batch:
        raise NotImplementedError

    def _fail(self, err: Exception, order: torch.Tensor, batch: int) -> DatasetError:
        return DatasetError(
            f"{self.dataset.name}: DALI failed in batch {batch} of the {self.view} view: {_dali_reason(err)}"
        )

    def __iter__(self) -> Iterator[Batch]:
        return self._epoch(None)

    def _epoch(self, normalise_and_cut: NormaliseAndCut | None) -> Iterator[Batch]:
        """This epoch's batches; a source that normalises on the host uses `normalise_and_cut` for that pass."""
        order = self.epoch_order()
        if order.numel() == 0:
            return
        B = self.config.batch_size
        try:
            pipe = self._build(order)
            pipe.build()
        except RuntimeError as err:
            raise DatasetError(
                f"{self.dataset.name}: cannot build the DALI {self.view} pipeline: {_dali_reason(err)}"
            ) from None
        batches, depth = len(self), self._depth()
        try:
            # schedule_run/outputs rather than run(): run() keeps `depth` iterations in flight past the
            # epoch's end, decoding batches nobody takes; here the last one scheduled is the epoch's last.
            for k in range(batches):
                try:
                    if k == 0:
                        pipe.schedule_run()  # the first call queues `depth` iterations
                    outputs = pipe.outputs()
                    if k + depth < batches:
                        pipe.schedule_run()  # one more in flight while this batch is used
                except RuntimeError as err:
                    raise self._fail(err, order, k) from None
                yield self._batch(outputs, k * B, order[k * B : (k + 1) * B], normalise_and_cut)
        finally:
            del pipe  # a pipeline that failed is unusable; each epoch builds its own anyway

    def _make_batch(self, images, indices, windows, flips) -> Batch:
        """Move the small per-sample tensors next to the images; labels come from the dataset's table."""
        indices = indices.to(self.device, torch.int64, non_blocking=True)
        return Batch(
            images=images,
            labels=self.labels[indices],
            indices=indices,
            windows=windows.to(self.device, torch.float32, non_blocking=True),
            flips=flips.to(self.device, torch.bool, non_blocking=True),
        )


# -- folders: files decoded by DALI ---------------------------------------------------------------------


def _random_crop(jpegs, area, ratio, image_size: int | None, decode_device: str):
    """Random-resized crop, decoding only the crop; returns (images (S, S, 3) uint8, window (4,) float32).
    With `image_size` None the crop is not resized: (h, w, 3) uint8 at the source's resolution."""
    from nvidia.dali import fn, types

    shape = fn.peek_image_shape(jpegs)  # (3,) int64: H, W, C of the source image
    anchor, size = fn.random_crop_generator(shape, random_area=list(area), random_aspect_ratio=list(ratio))
    # (2,) int32 each: anchor (y, x) and shape (h, w) in source pixels; integers, so the window is exact.
    images = fn.decoders.image_slice(
        jpegs, anchor, size, axis_names="HW", device=decode_device, output_type=types.RGB
    )  # (h, w, 3) uint8 (the default axis order is WH: without "HW" the window is transposed)
    if image_size is not None:
        images = fn.resize(images, size=[image_size, image_size])  # (S, S, 3) uint8, pixel centres map linearly
    hw = fn.cast(shape[0:2], dtype=types.FLOAT)  # (2,) H, W
    window = fn.cat(anchor / hw, (anchor + size) / hw)  # (4,) y0, x0, y1, x1 in the canonical frame
    return images, window


def _eval_view(jpegs, crop_fraction: float | None, image_size: int, decode_device: str):
    """Val (centre square of `crop_fraction` of the shorter side) or refresh (whole image, squashed).

    The centre crop is a region of interest of the resize, in source coordinates, rather than an integer
    crop of a resized image: the window is then exact, with no rounding of the resized size or the offset.
    Returns (images (S, S, 3) uint8, window (4,) float32 or None for the whole frame).
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)  # (H, W, 3) uint8
    if crop_fraction is None:
        return fn.resize(images, size=[image_size, image_size]), None  # (S, S, 3): the canonical frame itself
    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)  # (3,) H, W, C
    h, w = shape[0], shape[1]
    side = dmath.min(h, w) * crop_fraction  # source pixels
    lo = fn.stack((h - side) * 0.5 / h, (w - side) * 0.5 / w)  # (2,) y0, x0 in [0, 1]
    hi = fn.stack((h + side) * 0.5 / h, (w + side) * 0.5 / w)  # (2,) y1, x1
    images = fn.resize(images, size=[image_size, image_size], roi_start=lo, roi_end=hi, roi_relative=True)
    return images, fn.cat(lo, hi)  # (S, S, 3) uint8, (4,) float32


def pipeline_def(graph: Callable) -> Callable:
    """DALI's `@pipeline_def`, applied when the pipeline is first made (DALI is imported lazily)."""

    @functools.wraps(graph)
    def make(*args, **kwargs):
        from nvidia.dali import pipeline_def as dali_pipeline_def

        return dali_pipeline_def(graph)(*args, **kwargs)

    return make


@pipeline_def
def folder_pipeline(
    files: list[str],
    indices: list[int],
    view: str,
    image_size: int,
    crop_area: tuple[float, float],
    crop_ratio: tuple[float, float],
    crop_fraction: float | None,
    flip: bool,
    mean: list[float],
    std: list[float],
    dtype,
    decode_device: str,
    host_finish: bool = False,
):
    """The folder graph: (images (C, S, S), index, [window (4,)], [flip]); optional outputs per view.

    `host_finish` (train view, CPU): stop after decoding the crop, images (h, w, 3) uint8 of any size; the
    resize, flip and normalisation happen in `pipelines.host_finish` (faster than DALI's CPU resize).
    """
    from nvidia.dali import fn

    # The label is the sample's dataset index, so every output sample says which cache row it is.
    jpegs, index = fn.readers.file(files=files, labels=indices, name=READER, pad_last_batch=True)
    if view == "train":
        size = None if host_finish else image_size
        images, window = _random_crop(jpegs, crop_area, crop_ratio, size, decode_device)
    else:
        images, window = _eval_view(jpegs, crop_fraction, image_size, decode_device)
    mirror = fn.random.coin_flip(probability=0.5) if (view == "train" and flip) else None  # () int32
    if host_finish:
        return tuple(x for x in (images, index, window, mirror) if x is not None)
    images = fn.crop_mirror_normalize(
        images,
        mirror=0 if mirror is None else mirror,  # the flip is applied after the crop, as the contract says
        mean=[m * 255 for m in mean],
        std=[s * 255 for s in std],
        output_layout="CHW",
        dtype=dtype,
    )  # (3, S, S) normalised
    return tuple(x for x in (images, index, window, mirror) if x is not None)


class DaliFolderSource(_DaliSource):
    def __init__(self, dataset: FolderDataset, view: str, config: LoaderConfig):
        super().__init__(dataset, view, config)
        self.image_size = config.image_size if config.image_size is not None else FOLDER_IMAGE_SIZE
        self.paths = np.asarray(dataset.paths, dtype=object)  # indexed by an epoch's order, no Python loop
        self.has_window = view != "refresh"
        self.has_flip = view == "train" and config.flip
        self.host: HostFinish | None = None  # DaliHostFolderSource finishes its crops on the host

    def _build(self, order: torch.Tensor):
        return folder_pipeline(
            files=self.paths[order.numpy()].tolist(),
            indices=order.tolist(),
            view=self.view,
            image_size=self.image_size,
            crop_area=self.config.crop_area,
            crop_ratio=self.config.crop_ratio,
            crop_fraction=1.0 / self.config.val_resize if self.view == "val" else None,
            flip=self.config.flip,
            mean=self.mean,
            std=self.std,
            dtype=self._dali_type(),
            decode_device="mixed" if self.device_id is not None else "cpu",
            host_finish=self.host is not None,
            **self._pipeline_kwargs(),
        )

    def _batch(
        self, outputs: tuple, start: int, batch_order: torch.Tensor, normalise_and_cut: NormaliseAndCut | None
    ) -> Batch:
        n = batch_order.numel()  # the reader pads the last batch with repeats: keep the first n
        outputs = iter(outputs)
        images = next(outputs)  # (n, 3, S, S) finished by DALI, or (h, w, 3) crops for the host to finish
        indices = _to_torch(next(outputs), torch.device("cpu"))[:n].view(n)  # (n,) int32 from the reader
        if self.has_window:
            windows = _to_torch(next(outputs), torch.device("cpu"))[:n]  # (n, 4) float32
        else:
            windows = torch.tensor(_FULL_WINDOW).expand(n, 4)
        flips = _to_torch(next(outputs), torch.device("cpu"))[:n].view(n) if self.has_flip else torch.zeros(n)
        if self.host is None:
            return self._make_batch(_to_torch(images, self.device)[:n], indices, windows, flips)
        batch = self._make_batch(None, indices, windows, flips)
        with torch_threads(self.host_threads):  # beside DALI's threads, not against them
            resized = self.host.resize([images[i] for i in range(n)], batch.flips)  # (n, 3, S, S) uint8
            out = self.host.output(tuple(resized.shape))
            if normalise_and_cut is None:
                return batch._replace(images=self.host.normalise(resized, out))
            images = normalise_and_cut(
                resized, out, self.host.mean, self.host.std, batch.indices, batch.windows, batch.flips
            )
        return batch._replace(images=images)

    def _fail(self, err: Exception, order: torch.Tensor, batch: int) -> DatasetError:
        """Name the file behind a DALI failure: decode the failing batch and the prefetched ones with PIL."""
        B = self.config.batch_size
        window = order[batch * B : (batch + PREFETCH + 1) * B]  # the failing batch and those decoded ahead
        bad = check_images(self.dataset.subset(window), workers=self.config.num_threads)
        if bad:
            return CorruptImage(self.dataset.name, f"cannot decode {describe_bad_files(bad)}")
        named = re.search(r"Failed to decode sample #\d+ : (\S+)", str(err))
        first, last = self.paths[int(window[0])], self.paths[int(window[-1])]
        where = named.group(1) if named else f"one of the {window.numel()} files {first} ... {last}"
        return CorruptImage(self.dataset.name, f"DALI cannot read {where} ({_dali_reason(err)})")


# -- arrays: uint8 images held in memory ----------------------------------------------------------------


@pipeline_def
def array_pipeline(
    source: Callable[[], Iterator[tuple[np.ndarray, ...]]],
    view: str,
    height: int,
    width: int,
    out_size: tuple[int, int],
    mean: list[float],
    std: list[float],
    dtype,
    on_gpu: bool,
):
    """The array graph: batches of uint8 (B, H, W, C), plus for `train` per-sample crop anchors and flips
    drawn in torch (so an epoch's augmentation is a function of its seed alone); returns images (C, S, S)."""
    from nvidia.dali import fn

    if view == "train":
        images, anchor, mirror = fn.external_source(
            source=source, num_outputs=3, batch=True, layout=["HWC", None, None]
        )
    else:
        images, anchor, mirror = fn.external_source(source=source, batch=True, layout="HWC"), None, 0
    if on_gpu:
        images = images.gpu()
    if anchor is not None:
        # Pad-and-crop in one step: an H x W slice at (anchor_y, anchor_x) in [-pad, pad], zeros outside.
        images = fn.slice(images, anchor, [height, width], axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    if out_size != (height, width):
        images = fn.resize(images, size=list(out_size))  # (S, S, C): the whole crop, so windows are unchanged
    images = fn.crop_mirror_normalize(
        images,
        mirror=mirror,
        mean=[m * 255 for m in mean],
        std=[s * 255 for s in std],
        output_layout="CHW",
        dtype=dtype,
    )  # (C, S, S)
    return images


class DaliArraySource(_DaliSource):
    def __init__(self, dataset: ArrayDataset, view: str, config: LoaderConfig):
        super().__init__(dataset, view, config)
        self.images = dataset.images.cpu().numpy()  # (N, H, W, C) uint8, the external source's feed
        _, self.height, self.width, _ = self.images.shape
        size = config.image_size
        self.out_size = (self.height, self.width) if size is None else (size, size)

    def augmentation(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's crop anchors (count, 2) int32 (y, x) in [-pad, pad] and flips (count,) bool."""
        generator = torch.Generator().manual_seed(self.config.epoch_seed(self.epoch, _SALT_AUGMENT))
        pad = self.config.pad
        anchors = torch.randint(-pad, pad + 1, (count, 2), generator=generator, dtype=torch.int32)
        flips = torch.rand(count, generator=generator) < 0.5
        return anchors, flips & self.config.flip

    def _build(self, order: torch.Tensor):
        B = self.config.batch_size
        order_np = order.numpy()
        if self.view == "train":
            self.anchors, self.flips = self.augmentation(order.numel())
            anchors_np, flips_np = self.anchors.numpy(), self.flips.to(torch.int32).numpy()

        def source():  # one epoch, batch by batch; the last batch is partial (batch mode keeps it)
            for start in range(0, order_np.size, B):
                rows = order_np[start : start + B]
                if self.view == "train":
                    yield self.images[rows], anchors_np[start : start + B], flips_np[start : start + B]
                else:
                    yield self.images[rows]

        return array_pipeline(
            source=source,
            view=self.view,
            height=self.height,
            width=self.width,
            out_size=self.out_size,
            mean=self.mean,
            std=self.std,
            dtype=self._dali_type(),
            on_gpu=self.device_id is not None,
            **self._pipeline_kwargs(),
        )

    def _batch(
        self, outputs: tuple, start: int, batch_order: torch.Tensor, normalise_and_cut: NormaliseAndCut | None
    ) -> Batch:
        n = batch_order.numel()
        images = _to_torch(outputs[0], self.device)  # (n, C, S, S)
        if self.view != "train":
            return self._make_batch(images, batch_order, torch.tensor(_FULL_WINDOW).expand(n, 4), torch.zeros(n))
        hw = torch.tensor([self.height, self.width], dtype=torch.float32)
        lo = self.anchors[start : start + n].float() / hw  # (n, 2): the crop's top-left, outside [0, 1] in the pad
        return self._make_batch(images, batch_order, torch.cat([lo, lo + 1], dim=1), self.flips[start : start + n])


# -- the public entry points ----------------------------------------------------------------------------


class DaliHostFolderSource(HostNormalisingSource, DaliFolderSource):
    """The train view without a GPU: DALI decodes the crops, the host resizes, flips and normalises them (see
    pipelines.host_finish), and a stage can cut in that normalising pass."""

    def __init__(self, dataset: FolderDataset, view: str, config: LoaderConfig):
        super().__init__(dataset, view, config)
        self.host = HostFinish(self.image_size, self.mean, self.std, config.batch_size)
        self.host_threads = host_thread_limit(config.host_threads, max(1, config.num_threads))

    def normalised_epoch(self, normalise_and_cut: NormaliseAndCut) -> Iterator[Batch]:
        return self._epoch(normalise_and_cut)


def dali_folder_source(dataset: FolderDataset, view: str, config: LoaderConfig) -> DaliFolderSource:
    """An ImageFolder view decoded by DALI: `train` (random-resized crop + flip), `val` (centre crop of the
    shorter side / config.val_resize), `refresh` (the whole image squashed: the canonical frame). Without a GPU the
    train view is finished on the host (`cpu_resize="torch"`, faster than DALI's CPU resize)."""
    host = view == "train" and dali_device(config)[1] is None and config.cpu_resize == "torch"
    return (DaliHostFolderSource if host else DaliFolderSource)(dataset, view, config)


def dali_array_source(dataset: ArrayDataset, view: str, config: LoaderConfig) -> DaliArraySource:
    """In-memory uint8 images through DALI: `train` (pad-and-crop + flip), `val` and `refresh` (identity)."""
    return DaliArraySource(dataset, view, config)
