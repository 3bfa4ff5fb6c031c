"""Whole training runs for the benches: the trainer's defaults, quiet and without side output."""

from __future__ import annotations

from gutout.train.config import TrainConfig

# What every bench run turns off: W&B, the sample grid, the progress bar (none of them is what a bench times).
QUIET = dict(wandb="disabled", sample_grid=0, progress=False)


def bench_config(**overrides) -> TrainConfig:
    """The trainer's defaults with `overrides`, quiet."""
    return TrainConfig(**(TrainConfig().to_dict() | QUIET | overrides))
