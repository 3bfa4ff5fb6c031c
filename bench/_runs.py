"""Training runs for the benches: new ones with the trainer's defaults, quiet and without side output, and finished
ones rebuilt from their run directories."""

from __future__ import annotations

import yaml

from gutout.train.config import TrainConfig
from gutout.train.trainer import Trainer

# What every bench run turns off: W&B, the sample grid, the progress bar (none of them is what a bench times).
QUIET = dict(wandb="disabled", sample_grid=0, progress=False)


def bench_config(**overrides) -> TrainConfig:
    """The trainer's defaults with `overrides`, quiet."""
    return TrainConfig(**(TrainConfig().to_dict() | QUIET | overrides))


def rebuilt(run: str, out: str, **overrides) -> Trainer:
    """The trainer of the finished run in directory `run`, its members holding the weights of its last checkpoint:
    the run's config.yaml (data, split, subset, model, cut) with `overrides` on top, quiet, on the CPU, never
    resuming, and writing (if it trains at all) under `out` rather than into `run`."""
    saved = yaml.safe_load(open(f"{run}/config.yaml"))
    local = QUIET | dict(out=out, device="cpu", num_threads=0, resume=False, init_from=None)
    trainer = Trainer(TrainConfig(**(saved | local | overrides)), log=lambda *a: None)
    trainer.init_from(run)
    return trainer
