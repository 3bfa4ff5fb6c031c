"""Where metrics go: `metrics.jsonl` in the run directory (one JSON object per event) and W&B.

Two kinds of event share the log, in the order they happened: an epoch record (it has "epoch") after every epoch,
and a step record (it has "global_step", every key else under "step/") every few optimiser steps. `read_metrics`
splits them. W&B plots epoch records against "epoch" and step records against "global_step".

W&B is offline by default (the run lands in the run directory) and must never hang a run: an online init
that fails or times out falls back to offline with a warning.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

from gutout.atomic import atomic_write_bytes

# The key prefixes of epoch records (W&B plots them against the epoch).
EPOCH_PREFIXES = ("val/", "test/", "throughput/", "time/", "gutout/", "dist/", "lr")


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        mode: str,
        project: str,
        name: str,
        history: list[dict] | None = None,
        steps: list[dict] | None = None,
    ):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.history: list[dict] = list(history or [])  # epoch records
        self.steps: list[dict] = list(steps or [])  # step records
        # Resuming rewrites the log from the checkpoint's records: events after the checkpoint never happened.
        events = sorted(self.history + self.steps, key=_event_time)
        atomic_write_bytes(self.metrics_path, b"".join(json.dumps(r).encode() + b"\n" for r in events))
        self.wandb = None
        if mode != "disabled":
            self.wandb = _init_wandb(run_dir, config, mode, project, name)

    def log(self, record: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """An epoch record (with "epoch"), and optionally images for W&B."""
        self.history.append(record)
        self._write(record, images)

    def log_step(self, record: dict[str, Any]) -> None:
        """A step record (with "global_step")."""
        self.steps.append(record)
        self._write(record)

    def _write(self, record: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                payload = dict(record)
                for key, grid in (images or {}).items():
                    payload[key] = self._wandb_module.Image(grid)
                self.wandb.log(payload)
            except Exception as err:  # noqa: BLE001 - a dashboard must never stop training
                warnings.warn(
                    f"W&B logging failed ({err}); it is off for the rest of this run, metrics.jsonl has every record",
                    stacklevel=2,
                )
                self._close_wandb()

    @property
    def _wandb_module(self):
        import wandb

        return wandb

    def finish(self) -> None:
        self._close_wandb()

    def _close_wandb(self) -> None:
        run, self.wandb = self.wandb, None
        if run is not None:
            try:
                run.finish()
            except Exception as err:  # noqa: BLE001 - nor may closing it
                warnings.warn(f"W&B could not finish its run ({err})", stacklevel=2)


def _event_time(record: dict) -> tuple[float, int]:
    """Where an event falls in the run: a step record at its epoch progress, an epoch record after its last step."""
    if "global_step" in record:
        return record["step/epoch"], 0
    return record["epoch"] + 1, 1


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(epoch records, step records) of a run directory's metrics.jsonl; both empty when there is none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return [], []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if "epoch" in e], [e for e in events if "global_step" in e]


def _init_wandb(run_dir: Path, config: dict, mode: str, project: str, name: str):
    import wandb

    id_file = run_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # resumes reuse it
    id_file.write_text(run_id)
    settings = wandb.Settings(init_timeout=60, silent=True, console="off")
    kwargs = dict(
        project=project, name=name, id=run_id, resume="allow", dir=str(run_dir), config=config, settings=settings
    )
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as err:  # noqa: BLE001 - no network, no key: never let logging stop training
        if mode == "offline":
            warnings.warn(f"W&B could not start ({err}); logging to metrics.jsonl only", stacklevel=2)
            return None
        warnings.warn(f"W&B online init failed ({err}); logging offline instead", stacklevel=2)
        os.environ.setdefault("WANDB_MODE", "offline")
        try:
            run = wandb.init(mode="offline", **kwargs)
        except Exception as err2:  # noqa: BLE001 - nor may the offline fallback
            warnings.warn(f"W&B offline fallback failed too ({err2}); logging to metrics.jsonl only", stacklevel=2)
            return None
    # Epoch records plot against the epoch, step records (every key under "step/") against the global step.
    run.define_metric("epoch")
    run.define_metric("global_step")
    run.define_metric("step/*", step_metric="global_step")
    for prefix in EPOCH_PREFIXES:
        run.define_metric(f"{prefix}*", step_metric="epoch")
    run.define_metric("throughput/train_img_per_s", step_metric="epoch", summary="max")
    return run
