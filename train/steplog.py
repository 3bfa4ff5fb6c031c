"""Step records: what the dashboard shows while an epoch runs.

Every `TrainConfig.steps_per_record` optimiser steps, one record over the steps since the last: each member's mean
training loss, the learning rate, images/s of every member on every rank, the share of time spent waiting for the
loader, milliseconds per step, and on CUDA the memory in use. Losses accumulate on the device; a record reads
them once (one synchronisation, and one all-reduce across ranks, per record).
"""

from __future__ import annotations

import time

import torch


class StepWindow:
    """The open step record of an epoch, and the epoch's running totals of images forwarded and loader wait: the one
    place both are counted (the epoch record reads the totals, each step record the part since the last)."""

    def __init__(self, trainer, epoch: int, steps: int, start: float):
        self.trainer, self.epoch, self.steps = trainer, epoch, steps
        self.every = trainer.cfg.steps_per_record(steps)
        self.members = trainer.cfg.ensemble
        self.images, self.wait = 0, 0.0  # the epoch's totals on this rank
        self._reset(start, first_step=0)

    def _reset(self, start: float, first_step: int) -> None:
        self.start, self.first_step = start, first_step
        self.loss_sums = torch.zeros(self.members, dtype=torch.float64, device=self.trainer.device)
        self.counts = [0] * self.members
        self.opened_at = (self.images, self.wait)  # the totals when this record opened

    def _since_open(self) -> tuple[int, float]:
        return self.images - self.opened_at[0], self.wait - self.opened_at[1]

    def state(self) -> dict:
        """The running sums of the open record (a mid-epoch checkpoint holds them, beside the epoch's totals)."""
        images, wait = self._since_open()
        return dict(
            loss_sums=self.loss_sums.tolist(),
            counts=list(self.counts),
            images=images,
            wait=wait,
            first_step=self.first_step,
            elapsed=time.perf_counter() - self.start,
        )

    def restore(self, state: dict, images: int, wait: float) -> None:
        """Continue the record a checkpoint stopped in (`state`), in an epoch that had forwarded `images` and waited
        `wait` seconds so far."""
        self.loss_sums = torch.tensor(state["loss_sums"], dtype=torch.float64, device=self.trainer.device)
        self.counts, self.images, self.wait = list(state["counts"]), images, wait
        self.opened_at = (images - state["images"], wait - state["wait"])
        self.first_step, self.start = state["first_step"], time.perf_counter() - state["elapsed"]

    def add(self, member: int, loss: torch.Tensor, images: int, wait: float) -> None:
        """One member's optimiser step: its loss (a device scalar, not read here), images forwarded, loader wait."""
        self.loss_sums[member] += loss.double()
        self.counts[member] += 1
        self.images += images
        self.wait += wait

    def close(self, step: int) -> None:
        """The record of the steps since the last one, up to `step` (0-based within the epoch); then a new window."""
        trainer, runtime = self.trainer, self.trainer.runtime
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        totals = runtime.all_sum(
            [*self.loss_sums.tolist(), *self.counts, *self._since_open()], trainer.device
        )  # every rank's sums: (K losses, K counts, images, wait)
        losses, counts, (images, wait) = totals[: self.members], totals[self.members : -2], totals[-2:]
        record = {
            "global_step": self.epoch * self.steps + step + 1,
            "step/epoch": self.epoch + (step + 1) / self.steps,
            **{f"step/loss/member/{m}": losses[m] / counts[m] for m in range(self.members) if counts[m]},
            "step/lr": trainer.members[0].scheduler.get_last_lr()[0],
            "step/img_per_s": images / elapsed,
            "step/loader_wait_frac": wait / runtime.world / elapsed,
            "step/ms": 1e3 * elapsed / (step + 1 - self.first_step),
        }
        if trainer.device.type == "cuda":
            record["step/gpu_allocated_gb"] = torch.cuda.memory_allocated(trainer.device) / 2**30
            record["step/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        if runtime.is_main:
            trainer._log_step(record)
        self._reset(time.perf_counter(), first_step=step + 1)
