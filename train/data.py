"""A run's splits: the registered dataset's train and test sets, the validation split held out of the training
set, and the seeded training subset."""

from __future__ import annotations

from typing import NamedTuple

import torch

from gutout.config import ConfigError
from gutout.pipelines import LoaderConfig
from gutout.pipelines.datasets import class_mismatch, stratified_split
from gutout.pipelines.statistics import resolve_stats

from .config import TrainConfig

# The validation split's draw has a seed of its own, not the run's: every seed and configuration of a comparison is
# validated on the same samples, and each run's --subset is drawn from the samples left for training.
VALIDATION_SEED = 0x5EED


class Splits(NamedTuple):
    train: object
    val: object | None  # held out of the training set (--val-split), or None
    test: object


def load_splits(cfg: TrainConfig) -> Splits:
    """The splits; `val_split` samples held out of the training set (stratified, seeded by VALIDATION_SEED), and
    the rest cut to a subset seeded by the run's seed when `subset` is set."""
    train = cfg.spec.split("train", cfg.data, cfg.skip_corrupt)
    test = cfg.spec.split("test", cfg.data, cfg.skip_corrupt)
    if train.classes != test.classes:  # each split numbers its own sorted class folders
        raise ConfigError(class_mismatch(train, test))
    val, pool = None, torch.arange(len(train))  # pool: the positions training may use
    if cfg.val_split:
        if cfg.val_split >= len(train):
            raise ConfigError(
                f"--val-split {cfg.val_split} leaves none of the {len(train)} training samples of {cfg.dataset} to "
                "train on"
            )
        held_out, pool = stratified_split(train.labels, cfg.val_split, torch.Generator().manual_seed(VALIDATION_SEED))
        val = train.subset(held_out, tag="val")
    if cfg.subset is not None:
        if cfg.subset > len(pool):
            after = f" left after --val-split {cfg.val_split}" if cfg.val_split else ""
            raise ConfigError(f"--subset {cfg.subset} exceeds the {len(pool)} training samples{after} of {cfg.dataset}")
        chosen = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.subset]]
        train = train.subset(chosen.sort().values)
    elif cfg.val_split:
        train = train.subset(pool)
    return Splits(train, val, test)


def loader_config(
    cfg: TrainConfig, dataset, device: str = "cpu", half: bool = False, shard_id: int = 0, num_shards: int = 1
) -> LoaderConfig:
    """The loader settings of a run: its batch size, threads and seed, the dataset's statistics (in [0, 1] units)
    and image size, on `device`, for one shard (multi-process runs shard each member's data over its group)."""
    mean, std = resolve_stats(dataset, LoaderConfig())
    image_size = cfg.image_size if cfg.image_size is not None else cfg.spec.image_size
    return LoaderConfig(
        batch_size=cfg.batch_size,
        image_size=image_size,
        mean=mean,
        std=std,
        seed=cfg.seed,
        device=device,
        backend=cfg.backend,
        num_threads=cfg.num_threads,
        half=half,
        shard_id=shard_id,
        num_shards=num_shards,
    )
