"""GutoutLoader: a drop-in for `DataLoader` that yields Gutout'ed batches.

    loader = GutoutLoader.from_arrays(images, labels, batch_size=256, policy="threshold", device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:      # the existing loop, unchanged
            ...
        loader.refresh(model)              # Grad-CAM at the true labels -> the cache, for the next epoch

The loader reads maps from a SaliencyCache (through the peer rule) and cuts each batch; no model runs in it
except during `refresh()`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from gutout import GradCAM, GutoutStage, SaliencyCache, StageConfig
from gutout.config import ConfigError
from gutout.cut import CutConfig

from .batch import Batch, BatchSource, HostNormalisingSource, LoaderConfig
from .datasets import ArrayDataset, DatasetError, FolderDataset, class_labels, load_folder
from .statistics import resolve_stats

_LOADER_KEYS = {f.name for f in dataclasses.fields(LoaderConfig)}
_CUT_KEYS = {f.name for f in dataclasses.fields(CutConfig)}


def split_options(options: dict[str, Any]) -> tuple[dict, dict]:
    """Route flat keyword options to LoaderConfig or to the stage (CutConfig fields + `peers`); unknown fail."""
    loader, stage = {}, {}
    for key, value in options.items():
        if key in _LOADER_KEYS:
            loader[key] = value
        elif key in _CUT_KEYS or key == "peers":
            stage[key] = value
        else:
            known = sorted(_LOADER_KEYS | _CUT_KEYS | {"peers"})
            raise ConfigError(f"unknown GutoutLoader option {key!r}; known options: {', '.join(known)}")
    return loader, stage


def resolve_backend(backend: str, dataset) -> str:
    """The backend "auto" stands for: tensor for in-memory arrays; for image folders DALI where it imports, else
    torch. Named backends are returned as they are."""
    if backend != "auto":
        return backend
    if isinstance(dataset, ArrayDataset):
        return "tensor"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "torch"
    return "dali"


def make_source(dataset: ArrayDataset | FolderDataset, view: str, config: LoaderConfig) -> BatchSource:
    """The backend's BatchSource for one view of `dataset`."""
    backend = resolve_backend(config.backend, dataset)
    if backend != config.backend:
        config = dataclasses.replace(config, backend=backend)
    if config.backend == "tensor":
        from .tensor_backend import TensorArraySource

        return TensorArraySource(dataset, view, config)
    if config.backend == "torch":
        from .torch_backend import TorchSource

        return TorchSource(dataset, view, config)
    try:
        from . import dali
    except ImportError as err:  # pragma: no cover - DALI is a Linux dependency
        raise ImportError(f"backend 'dali' needs nvidia-dali ({err}); use backend='torch' or 'tensor'") from None
    if isinstance(dataset, FolderDataset):
        return dali.dali_folder_source(dataset, view, config)
    return dali.dali_array_source(dataset, view, config)


class GutoutLoader:
    def __init__(
        self,
        dataset: ArrayDataset | FolderDataset,
        config: LoaderConfig,
        stage: StageConfig | None = None,
        *,
        cache: SaliencyCache | None = None,
        member: int = 0,
    ):
        stage = stage or StageConfig(cut=CutConfig(policy="none"))
        if cache is not None:
            check_cache_matches(cache, dataset)
        self.dataset, self.config, self.cache, self.member = dataset, config, cache, member
        self.stage = GutoutStage(stage, cache, member)
        self.source = make_source(dataset, "train", config)
        self.epoch = 0

    # -- construction from the user's data -----------------------------------------------------------

    @classmethod
    def from_folder(cls, root, *, cache=None, member: int = 0, skip_corrupt: bool = False, **options):
        """An ImageFolder tree; `options` are LoaderConfig fields, CutConfig fields and `peers`."""
        loader_options, stage_options = split_options(options)
        dataset = load_folder(root, skip_corrupt=skip_corrupt)
        return cls(
            dataset, LoaderConfig(**loader_options), _stage_config(stage_options, cache), cache=cache, member=member
        )

    @classmethod
    def from_arrays(cls, images, labels, *, classes=None, cache=None, member: int = 0, name="arrays", **options):
        """uint8 images (N, H, W[, C]) and labels (N,); `options` as in `from_folder` (`pad` for the crop)."""
        images = torch.as_tensor(images)
        if classes is None:  # the classes the labels name, 0 .. max
            checked = class_labels(labels, None, name)
            classes = tuple(str(c) for c in range(int(checked.max()) + 1 if checked.numel() else 0))
        loader_options, stage_options = split_options(options)
        dataset = ArrayDataset(images, labels, classes, name)
        return cls(
            dataset, LoaderConfig(**loader_options), _stage_config(stage_options, cache), cache=cache, member=member
        )

    # -- the DataLoader face ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.source.set_epoch(epoch)

    def batches(self, keep_clean: bool = False) -> Iterator[Batch]:
        """Gutout'ed batches with their indices, windows and flips; with `keep_clean`, each also carries its images
        before the cut (`.clean`), for training on both views."""
        generator = torch.Generator().manual_seed(self.config.epoch_seed(self.epoch, salt=self.member + 1))
        if isinstance(self.source, HostNormalisingSource) and not keep_clean:  # cut in the normalising pass
            yield from self.source.normalised_epoch(
                functools.partial(self.stage.normalise_and_cut, generator=generator)
            )
            return
        for batch in self.source:
            clean = batch.images.clone() if keep_clean else None
            images = self.stage(batch.images, batch.indices, batch.windows, batch.flips, generator)
            yield batch._replace(images=images, clean=clean)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch.images, batch.labels

    @property
    def stats(self):
        """Erased-fraction statistics of the stage (mean, std) since the last `stats.reset()`."""
        return self.stage.stats

    def view(self, name: str, batch_size: int | None = None) -> BatchSource:
        """Another view of the same dataset: "val" or "refresh" (every sample once, in order)."""
        config = self.config if batch_size is None else dataclasses.replace(self.config, batch_size=batch_size)
        return make_source(self.dataset, name, config)

    # -- saliency refresh ------------------------------------------------------------------------------

    def refresh(
        self,
        model: torch.nn.Module,
        layer: str | None = None,
        *,
        publish: bool = True,
        batch_size: int | None = None,
        correct_only: bool = False,
        part: tuple[int, int] | None = None,
        image_size: int | None = None,
    ) -> None:
        """Grad-CAM of `model` at the true labels over the dataset (refresh view: the canonical frame), written
        into the cache as this loader's member and published. With `correct_only`, the maps of samples the model
        misclassifies are stored as unusable: readers treat those samples as having no map. `part=(i, n)`
        refreshes only the samples at positions i, i + n, i + 2n, ...; the others keep their maps. `image_size`
        runs the pass at another input side than the loader's (a smaller one: a cheaper pass, coarser maps, which
        are resampled to the cache's grid like any other)."""
        if self.cache is None:
            raise ValueError("refresh() needs a SaliencyCache: build the loader with cache=")
        cam = GradCAM(model, layer, target=self.cache.target if self.cache.target in ("label", "pred") else "label")
        positions, dataset, config = self._refresh_samples(part, batch_size)
        if image_size is not None:
            config = dataclasses.replace(config, image_size=image_size)
        for batch in make_source(dataset, "refresh", config):
            maps = cam(batch.images, batch.labels)  # (B, h, w)
            usable = cam.last_predictions == batch.labels if correct_only else None  # (B,)
            indices = batch.indices if positions is None else positions[batch.indices.cpu()]
            self.cache.update(self.member, indices, fit_map_size(maps, self.cache.map_size), usable=usable)
        if self.cache.layer is None:
            self.cache.layer = cam.layer_name
        if publish:
            self.cache.publish()

    def _refresh_samples(self, part: tuple[int, int] | None, batch_size: int | None):
        """(positions of the refreshed samples in the dataset or None for all, the dataset they form, its config)."""
        config = self.config if batch_size is None else dataclasses.replace(self.config, batch_size=batch_size)
        if part is None:
            return None, self.dataset, config
        index, parts = part
        if not 0 <= index < parts:
            raise ValueError(f"refresh part {index} of {parts}: the index must lie in [0, {parts})")
        positions = torch.arange(index, len(self.dataset), parts)
        # The part's images normalised as the whole dataset's (statistics measured on a subset would differ).
        mean, std = resolve_stats(self.dataset, self.config)
        config = dataclasses.replace(config, mean=mean, std=std)
        return positions, self.dataset.subset(positions, tag=f"refresh part {index} of {parts}"), config


def fit_map_size(maps: torch.Tensor, map_size: tuple[int, int]) -> torch.Tensor:
    """Resample maps (B, h, w) to the cache's grid (both span the canonical frame), keeping max-normalisation."""
    if tuple(maps.shape[-2:]) == tuple(map_size):
        return maps
    resized = F.interpolate(maps[:, None], size=map_size, mode="bilinear", align_corners=False, antialias=True)[:, 0]
    peak = resized.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, resized / peak.clamp_min(1e-12), 0.0)


def check_cache_matches(cache: SaliencyCache, dataset) -> None:
    """A cache indexed for another dataset is an error naming both; an unlabelled cache adopts this one."""
    if cache.samples != len(dataset):
        raise DatasetError(f"the cache holds {cache.samples} samples but {dataset.name} has {len(dataset)}")
    if cache.fingerprint is None:
        cache.fingerprint = dataset.fingerprint
    elif cache.fingerprint != dataset.fingerprint:
        raise DatasetError(
            f"the cache was built for dataset {cache.fingerprint}, but {dataset.name} is {dataset.fingerprint}"
        )


def _stage_config(options: dict, cache: SaliencyCache | None) -> StageConfig:
    options = dict(options)
    options.setdefault("policy", "none")
    if "peers" not in options:  # a single member can only use its own maps
        options["peers"] = "others" if cache is not None and cache.members > 1 else "self"
    return StageConfig.from_flat(options)
