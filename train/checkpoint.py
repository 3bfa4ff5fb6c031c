"""Checkpoints: every member's file, then the common file that marks an epoch complete; resuming; --init-from.

Member files (`member-<m>.epoch-<e>.pt`: model, optimiser, scheduler, grad scaler) are written first, by the first
rank of each member's group; then rank 0 writes `checkpoint.pt` (the configuration's identity, the cache's state,
every RNG, the history), which marks epoch e complete. Each write is atomic, so a run killed at any moment
resumes from the last epoch whose common file was written, and ends with the metrics of an uninterrupted run.
A mid-epoch checkpoint (a stop signal, --checkpoint-every) is the same with `.step-<s>` in the member files' names
and the step and the epoch's running sums in the common file.

The last two complete checkpoints are kept: when the common file is replaced, the one it replaces becomes
`checkpoint.previous.pt` (a hard link, so no moment is without a complete latest; made only once the new common
file is on disk, so a kill while it is written leaves both), and the member files of both positions stay. A resume
whose latest checkpoint cannot be read (the common file or a member file truncated or damaged) says which file and
continues from the previous one.
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
from .rundir import CHECKPOINT, PREVIOUS_CHECKPOINT, ResumeMismatch


class DamagedCheckpoint(ResumeMismatch):
    """A checkpoint file that cannot be read, or a member file its common file needs that is missing."""


def member_path(run_dir: Path, member: int, epoch: int, step: int | None = None) -> Path:
    """A member's file at the end of `epoch`, or after `step` optimiser steps of it (a mid-epoch checkpoint)."""
    return run_dir / (
        f"member-{member}.epoch-{epoch}.pt" if step is None else f"member-{member}.epoch-{epoch}.step-{step}.pt"
    )


def position(epoch: int, step: int | None = None) -> tuple[int, float]:
    """A checkpoint's place in the run, in order: a complete epoch sorts after all of its steps."""
    return epoch, float("inf") if step is None else float(step)


def _position(path: Path) -> tuple[int, float]:
    """(epoch, step) of a member file's name, as `position` orders them."""
    parts = path.name.split(".")  # member-0, epoch-3[, step-120], pt
    step = next((int(p.split("-")[1]) for p in parts if p.startswith("step-")), None)
    return position(int(parts[1].split("-")[1]), step)


def save(
    run_dir: Path,
    epoch: int,
    members: list[Member],
    common: dict,
    layout: Layout,
    runtime: Runtime,
    step: int | None = None,
    keep_latest: bool = True,
) -> None:
    """Member files, then (rank 0) the common file `common`: epoch `epoch` (or its first `step` steps) is complete
    when this returns. The common file it replaces becomes the previous checkpoint, unless `keep_latest` is False
    (the run resumed from the previous one because the latest is damaged: that one stays the fallback)."""
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
        # The latest becomes the previous only once its successor is on disk: a kill while the common file is
        # written leaves two distinct complete checkpoints, not the latest under both names.
        keep = run_dir / PREVIOUS_CHECKPOINT if keep_latest else None
        with atomic_writer(run_dir / CHECKPOINT, keep_replaced_as=keep) as f:
            torch.save(common, f)


def prune(run_dir: Path, keep: list[tuple[int, float]], runtime: Runtime) -> None:
    """Remove every member file but those at the positions `keep` (the latest and the previous checkpoint's)."""
    if runtime.is_main:
        for old in run_dir.glob("member-*.epoch-*.pt"):
            if _position(old) not in keep:
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
    and step records); mid-epoch, also the steps done (`step`) and the epoch's running sums (`progress`, one entry
    per rank)."""
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


def load(run_dir: Path, cfg: TrainConfig, members: list[Member], cache: SaliencyCache, log=print) -> dict | None:
    """Restore the last complete checkpoint into `members`, `cache` and the RNGs; returns the common state (its
    "epoch", "step", "history", and "fell_back": whether the latest was damaged and the previous one used), or
    None when there is none. Another run's checkpoint is refused, naming each difference; a damaged one is named,
    and the previous complete checkpoint is used instead when there is one."""
    candidates = [run_dir / name for name in (CHECKPOINT, PREVIOUS_CHECKPOINT) if (run_dir / name).exists()]
    if not candidates:
        return None
    damage: list[str] = []
    for path in candidates:
        try:
            state = _read(path)
            _check_identity(path, state, cfg)
            saved = [_read(_member_file(run_dir, m.index, state)) for m in members]
        except DamagedCheckpoint as err:
            damage.append(str(err))
            continue
        if damage:
            log(f"{damage[0]}; resuming from the previous complete checkpoint, {path}")
        break
    else:
        hint = "" if len(candidates) > 1 else f" (and no previous complete checkpoint, {PREVIOUS_CHECKPOINT}, is kept)"
        raise DamagedCheckpoint("; ".join(damage) + hint)
    try:
        cache.load_state_dict(state["cache"], source=str(path))
    except CacheSnapshotError as err:  # e.g. the folder's files changed under the same path
        raise ResumeMismatch(f"{err}; refusing to resume with maps of other samples") from None
    for member, member_state in zip(members, saved, strict=True):
        member.net.load_state_dict(member_state["model"])
        member.optimizer.load_state_dict(member_state["optimizer"])
        member.scheduler.load_state_dict(member_state["scheduler"])
        member.scaler.load_state_dict(member_state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state | {"fell_back": bool(damage)}


def _check_identity(path: Path, state: dict, cfg: TrainConfig) -> None:
    """Refuse another run's checkpoint, naming each difference."""
    differences = identity_differences(state["config"], cfg.identity())
    if differences:
        diffs = "; ".join(f"{k}: checkpoint has {theirs!r}, this run has {mine!r}" for k, theirs, mine in differences)
        hint = ""
        if any(k == "epochs" for k, _, _ in differences):
            hint = (
                ". --resume continues the same schedule, which the number of epochs shapes; to train on from this "
                f"run, start a new one initialised from it: --init-from {path.parent} --name <another name>"
            )
        raise ResumeMismatch(f"{path} belongs to a different run; refusing to resume: {diffs}{hint}")


def _member_file(run_dir: Path, member: int, state: dict) -> Path:
    """The member file a common state needs (DamagedCheckpoint when it is missing)."""
    path = member_path(run_dir, member, state["epoch"], state.get("step"))
    if not path.exists():
        raise DamagedCheckpoint(f"checkpoint of epoch {state['epoch']} is incomplete: {path} is missing")
    return path


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
        raise DamagedCheckpoint(f"cannot read checkpoint {path}: {err}") from None
