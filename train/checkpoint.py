"""Checkpoints: every member's file, then the common file that marks an epoch complete; resuming; --init-from.

Member files (`member-<m>.epoch-<e>.pt`: model, optimiser, scheduler, grad scaler) are written first, by the first
rank of each member's group; then rank 0 writes `checkpoint.pt` (the configuration's identity, the cache's state,
every RNG, the history), which marks epoch e complete. Each write is atomic, so a run killed at any moment
resumes from the last epoch whose common file was written, and ends with the metrics of an uninterrupted run.
A mid-epoch checkpoint (a stop signal, --checkpoint-every) is the same with `.step-<s>` in the member files' names
and the step and the epoch's running sums in the common file.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from gutout import SaliencyCache
from gutout.atomic import atomic_writer
from gutout.cache import CacheSnapshotError
from gutout.config import ConfigError

from .config import TrainConfig, identity_differences
from .distributed import Layout, Runtime
from .members import Member
from .rundir import CHECKPOINT, ResumeMismatch


def member_path(run_dir: Path, member: int, epoch: int, step: int | None = None) -> Path:
    """A member's file at the end of `epoch`, or after `step` optimiser steps of it (a mid-epoch checkpoint)."""
    return run_dir / (
        f"member-{member}.epoch-{epoch}.pt" if step is None else f"member-{member}.epoch-{epoch}.step-{step}.pt"
    )


def _position(path: Path) -> tuple[int, float]:
    """(epoch, step) of a member file's name; a complete epoch sorts after all of its steps."""
    parts = path.name.split(".")  # member-0, epoch-3[, step-120], pt
    step = next((float(p.split("-")[1]) for p in parts if p.startswith("step-")), float("inf"))
    return int(parts[1].split("-")[1]), step


def save(
    run_dir: Path,
    epoch: int,
    members: list[Member],
    common: dict,
    layout: Layout,
    runtime: Runtime,
    step: int | None = None,
) -> None:
    """Member files, then (rank 0) the common file `common`: epoch `epoch` (or its first `step` steps) is complete
    when this returns."""
    if layout.group_leader:
        for m in members:
            state = {
                "model": m.net.state_dict(),
                "optimizer": m.optimizer.state_dict(),
                "epoch": epoch,
                "scheduler": m.scheduler.state_dict(),
                "scaler": m.scaler.state_dict(),
            }
            with atomic_writer(member_path(run_dir, m.index, epoch, step)) as f:
                torch.save(state, f)
    runtime.barrier()
    if runtime.is_main:
        with atomic_writer(run_dir / CHECKPOINT) as f:
            torch.save(common, f)


def prune(run_dir: Path, epoch: int, runtime: Runtime, step: int | None = None) -> None:
    """Remove the member files from before (epoch, step), which its complete checkpoint supersedes."""
    if runtime.is_main:
        current = (epoch, float("inf") if step is None else step)
        for old in run_dir.glob("member-*.epoch-*.pt"):
            if _position(old) < current:
                old.unlink(missing_ok=True)
    runtime.barrier()


def common_state(
    cfg: TrainConfig,
    epoch: int,
    cache: SaliencyCache,
    history: list[dict],
    steps: list[dict],
    step: int | None = None,
    progress: dict | None = None,
) -> dict:
    """What every rank shares: the run's identity, the cache (both buffers), every RNG, the metrics so far (epoch
    and step records); mid-epoch, also the steps done (`step`) and the epoch's running sums (`progress`)."""
    return {
        "config": cfg.identity(),
        "epoch": epoch,
        "step": step,
        "progress": progress,
        "cache": cache.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "history": history,
        "steps": steps,
    }


def load(run_dir: Path, cfg: TrainConfig, members: list[Member], cache: SaliencyCache) -> dict | None:
    """Restore the last complete checkpoint into `members`, `cache` and the RNGs; returns the common state (its
    "epoch" and "history"), or None when there is none. Another run's checkpoint is refused, naming each
    difference."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    state = _read(path)
    differences = identity_differences(state["config"], cfg.identity())
    if differences:
        diffs = "; ".join(f"{k}: checkpoint has {theirs!r}, this run has {mine!r}" for k, theirs, mine in differences)
        hint = ""
        if any(k == "epochs" for k, _, _ in differences):
            hint = (
                ". --resume continues the same schedule, which the number of epochs shapes; to train on from this "
                f"run, start a new one initialised from it: --init-from {run_dir} --name <another name>"
            )
        raise ResumeMismatch(f"{path} belongs to a different run; refusing to resume: {diffs}{hint}")
    try:
        cache.load_state_dict(state["cache"], source=str(path))
    except CacheSnapshotError as err:  # e.g. the folder's files changed under the same path
        raise ResumeMismatch(f"{err}; refusing to resume with maps of other samples") from None
    epoch, step = state["epoch"], state.get("step")
    for member in members:
        member_file = member_path(run_dir, member.index, epoch, step)
        if not member_file.exists():
            raise ResumeMismatch(f"checkpoint of epoch {epoch} is incomplete: {member_file} is missing")
        saved = _read(member_file)
        member.net.load_state_dict(saved["model"])
        member.optimizer.load_state_dict(saved["optimizer"])
        member.scheduler.load_state_dict(saved["scheduler"])
        member.scaler.load_state_dict(saved["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def init_weights(run_dir: str | Path, members: list[Member], model_name: str) -> int:
    """Start every member from the weights of another run's last complete checkpoint (a new run: fresh optimiser,
    schedule and maps). Returns that checkpoint's epoch."""
    run_dir = Path(run_dir)
    try:
        state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        epoch, step = state["epoch"], state.get("step")
    except FileNotFoundError:
        raise ConfigError(f"--init-from {run_dir}: no {CHECKPOINT} there (not a run, or none checkpointed)") from None
    except Exception as err:  # noqa: BLE001 - a damaged file, named
        raise ConfigError(f"--init-from {run_dir}: cannot read {run_dir / CHECKPOINT}: {err}") from None
    for member in members:
        path = member_path(run_dir, member.index, epoch, step)
        if not path.exists():
            raise ConfigError(
                f"--init-from {run_dir}: no weights for member {member.index} ({path.name}); it must have at least "
                "as many members as --ensemble"
            )
        try:
            member.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
        except Exception as err:  # noqa: BLE001 - another model or class count: say which file
            first_line = str(err).splitlines()[0]
            raise ConfigError(f"--init-from {run_dir}: {path.name} does not fit {model_name}: {first_line}") from None
    return epoch


def _read(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is named, not a bare unpickling error
        raise ResumeMismatch(f"cannot read checkpoint {path}: {err}") from None
