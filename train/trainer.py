"""The ensemble trainer: K members, a shared saliency cache, a refresh each epoch, metrics, exact resume.

Each epoch: the members train interleaved (one step each, in turn), each on batches cut with its peers' maps from
the cache; then the refresh (a Grad-CAM pass over the training set, or the maps harvested from the training
forwards) is published, so epoch e + 1 cuts with epoch e's maps; then every member is evaluated, the ensemble
metrics are logged, and an atomic checkpoint is written (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from gutout import ActivationCapture, SaliencyCache, StageConfig, cam_from_activations, warp_to_canonical
from gutout.pipelines.loader import resolve_backend

from . import checkpoint, figures
from .config import TrainConfig
from .data import load_splits, loader_config
from .distributed import Runtime, plan_layout, resolve_device
from .diversity import class_cams, exchange_peer_cams, similarity
from .evaluation import Evaluator
from .members import NonFiniteLoss, build_member, check_finite, epoch_record, new_model, probe_layer
from .report import NoProgress, epoch_line
from .rundir import ResumeMismatch, RunDirectoryLock, check_run_dir, git_revision, record_run, writing
from .steplog import StepWindow
from .tracking import Tracker

__all__ = ["NonFiniteLoss", "Trainer", "git_revision"]


# Signals that stop a run at the next step with a checkpoint: schedulers' preemption notice (SLURM and Kubernetes
# send SIGTERM, then SIGKILL after a grace period; SLURM's --signal=USR1@T sends SIGUSR1 T seconds ahead).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again with --resume


class Preempted(Exception):
    """A stop signal ended the run after a checkpoint; the message says which signal and where to resume."""

    def __init__(self, signal_name: str, note: str):
        super().__init__(f"stopped by {signal_name}: {note}")


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print, runtime: Runtime | None = None):
        self.runtime = runtime or Runtime()
        if self.runtime.restarted and not cfg.resume:  # torchrun restarted the workers: continue the run
            cfg = dataclasses.replace(cfg, resume=True)
        self.cfg, self.run_dir = cfg, cfg.run_dir
        self.log = log if self.runtime.is_main else (lambda *args, **kwargs: None)
        self.device = resolve_device(cfg.device, self.runtime.local_rank)
        self.runtime.start(self.device)
        self.layout = plan_layout(cfg.ensemble, self.runtime.world, self.runtime.rank)
        self.runtime.member_groups(self.layout, cfg.ensemble)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.train_set, self.val_set, self.test_set = load_splits(cfg)
        self.eval_split = "val" if self.val_set is not None else "test"  # what every epoch is scored on
        self.backend = resolve_backend(cfg.backend, self.train_set)
        self.num_classes = len(self.train_set.classes)
        self.loader_config = loader_config(
            cfg, self.train_set, str(self.device), self.amp, self.layout.shard_id, self.layout.group_size
        )
        model = lambda m: new_model(cfg, m, self.num_classes, self.train_set.channels, self.device, self.amp)  # noqa: E731
        self.layer, self.map_size = probe_layer(model(0), self.train_set, self.loader_config)
        self.cache = SaliencyCache(
            cfg.ensemble,
            len(self.train_set),
            self.map_size,
            device=self.device,
            fingerprint=self.train_set.fingerprint,
            layer=self.layer,
            target=cfg.target,
        )
        self.stage_config = StageConfig(cfg.cut_config(), peers=cfg.peer_rule)
        self.members = [
            build_member(
                cfg,
                m,
                model(m),
                self.train_set,
                self.loader_config,
                self.stage_config,
                self.cache,
                self.layout,
                self.runtime,
                self.amp,
            )
            for m in self.layout.members
        ]
        self.eval_batch_size = cfg.eval_batch_for(self.device.type)  # evaluation's and the refresh pass's
        eval_config = dataclasses.replace(self.loader_config, batch_size=self.eval_batch_size)
        self.evaluator = Evaluator(
            {m.index: m.net for m in self.members},
            cfg.ensemble,
            self.num_classes,
            eval_config,
            self.runtime.all_gather_rows,
            self._autocast,
            self.layer,
            channels_last=self.amp,
        )
        self.history: list[dict] = []  # epoch records
        self.steps: list[dict] = []  # step records (rank 0 keeps them; the checkpoint holds them)
        self._log_step = self.steps.append  # where step records go: the tracker's log once the run starts
        self.start_epoch = 0
        self.resume_progress: dict | None = None  # a mid-epoch checkpoint's position and running sums
        self.checkpointed_epoch: int | None = None  # the last epoch whose checkpoint is complete on disk
        self.checkpointed_step: int | None = None  # ... and its steps, when that checkpoint is mid-epoch
        self._latest_damaged = False  # resumed from the previous checkpoint: the next save must not keep the latest
        self._checkpointed_at = time.monotonic()  # when the last checkpoint was written (--checkpoint-minutes)
        self.stop_signal: int | None = None  # SIGTERM / SIGUSR1 received: stop after the current step
        # An epoch's wall time runs from the previous epoch's last metric to its own, so the previous epoch's
        # logging and checkpoint count in it: these carry that boundary across (None: the run's first epoch here).
        self._boundary: float | None = None
        self._checkpoint_s = 0.0

    # -- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self, epoch: int, step: int | None = None, progress: dict | None = None) -> None:
        """The checkpoint at the end of `epoch`, or after its first `step` steps (with the epoch's running sums)."""
        common = None
        if self.runtime.is_main:
            common = checkpoint.common_state(self.cfg, epoch, self.cache, self.history, self.steps, step, progress)
        previous = self.checkpointed_epoch, self.checkpointed_step
        keep_latest = not self._latest_damaged
        checkpoint.save(self.run_dir, epoch, self.members, common, self.layout, self.runtime, step, keep_latest)
        # Complete from the rename on, whatever interrupts what follows.
        self.checkpointed_epoch, self.checkpointed_step, self._latest_damaged = epoch, step, False
        self._checkpointed_at = time.monotonic()
        kept = [checkpoint.position(epoch, step)]
        if previous[0] is not None:
            kept.append(checkpoint.position(*previous))
        checkpoint.prune(self.run_dir, kept, self.runtime)

    def load_checkpoint(self) -> bool:
        state = checkpoint.load(self.run_dir, self.cfg, self.members, self.cache, log=self.log)
        if state is None:
            return False
        self._latest_damaged = state["fell_back"]
        step = state.get("step")
        self.history, self.start_epoch = state["history"], state["epoch"] + (1 if step is None else 0)
        self.steps[:] = state.get("steps", [])  # a checkpoint older than step records has none
        self.checkpointed_epoch, self.checkpointed_step = state["epoch"], step
        if step is not None:
            ranks = state["progress"]  # one entry per rank of the run that wrote it (one process: a dict, before)
            ranks = [ranks] if isinstance(ranks, dict) else ranks
            if len(ranks) != self.runtime.world:
                raise ResumeMismatch(
                    f"the checkpoint in {self.run_dir} stopped in the middle of epoch {state['epoch']} on "
                    f"{len(ranks)} processes; it resumes on {len(ranks)} (--nproc {len(ranks)}), not "
                    f"{self.runtime.world}: the epoch's data is sharded by process"
                )
            self.resume_progress = {"step": step, **ranks[self.runtime.rank]}
        return True

    def init_from(self, run_dir) -> int:
        return checkpoint.init_weights(run_dir, self.members, self.cfg.model_name)

    def checkpoint_note(self) -> str:
        """Where a stopped run can continue from, for the message that says it stopped."""
        if self.checkpointed_epoch is None:
            return f"no epoch of {self.run_dir} was checkpointed yet"
        where = f"epoch {self.checkpointed_epoch}"
        if self.checkpointed_step is not None:
            where = f"step {self.checkpointed_step} of {where}"
        return f"the checkpoint of {where} in {self.run_dir} is complete; continue with --resume"

    # -- one epoch ---------------------------------------------------------------------------------------

    def _refresh_due(self, boundary: int) -> bool:
        """Refresh at the boundary before epoch `boundary` (0 = before training)?"""
        cfg = self.cfg
        if not cfg.needs_maps or boundary >= cfg.epochs:
            return False  # baselines read no maps; after the last epoch nobody would read them
        # Harvested maps exist only after an epoch: there, cut_start 0 is cut_start 1 (no empty publish first).
        start = max(cfg.cut_start, 1) if cfg.refresh == "harvest" else cfg.cut_start
        return boundary >= start and (boundary - start) % cfg.refresh_every == 0

    def _refresh_part(self, boundary: int) -> tuple[int, int] | None:
        """Which part of the samples the refresh at `boundary` covers ((index, parts), or None: all of them). The
        first refresh covers every sample; the later ones take the parts in turn (--refresh-fraction)."""
        cfg = self.cfg
        done = (boundary - cfg.cut_start) // cfg.refresh_every  # refreshes before this one
        if cfg.refresh_parts == 1 or done == 0:
            return None
        return (done - 1) % cfg.refresh_parts, cfg.refresh_parts

    def refresh(self, epoch: int) -> tuple[float, int]:
        """Publish fresh maps for the next epoch: this rank's members on this rank's shard, then the entries of every
        rank all-gathered. Returns (seconds spent, bytes this rank received)."""
        start = time.perf_counter()
        if self.cfg.refresh == "pass":
            for member in self.members:
                with self._autocast():
                    member.loader.refresh(
                        member.net,
                        self.layer,
                        publish=False,
                        batch_size=self.eval_batch_size,
                        correct_only=self.cfg.correct_only,
                        part=self._refresh_part(epoch + 1),
                        image_size=self.cfg.refresh_size,
                    )
        received = self.runtime.sync_cache(self.cache)
        self.cache.publish(epoch)
        return time.perf_counter() - start, received

    def _harvesting(self) -> bool:
        return self.cfg.refresh == "harvest" and self.cfg.needs_maps

    def _sync_harvest(self) -> tuple[float, int]:
        """An epoch end without a refresh, or a checkpoint inside an epoch: in a multi-process harvest run,
        all-gather the maps harvested since the last gather now (unpublished), so that the checkpoint rank 0 writes
        holds every rank's maps and a sample harvested by another rank next epoch overwrites this one rather than
        racing it at the refresh."""
        if not (self.runtime.distributed and self._harvesting()):
            return 0.0, 0
        start = time.perf_counter()
        received = self.runtime.sync_cache(self.cache)
        self.cache.mark_synced()
        return time.perf_counter() - start, received

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16) if self.amp else nullcontext()

    def _harvest(self, member, activations, logits, batch) -> None:
        """Harvest mode: this step's CAM (closed form from the forward's activations), back in the canonical frame,
        written where the crop saw the image."""
        predictions = logits.detach().argmax(-1)  # (B,)
        targets = batch.labels if self.cfg.target == "label" else predictions
        cams = cam_from_activations(activations, member.net.fc.weight, targets)  # (B, h', w')
        maps, covered = warp_to_canonical(cams, batch.windows, batch.flips, self.map_size)
        usable = predictions == batch.labels if self.cfg.correct_only else None
        self.cache.update(member.index, batch.indices, maps, covered=covered, usable=usable)

    def train_epoch(self, epoch: int, progress) -> dict:
        cfg, harvest = self.cfg, self._harvesting()
        stage = dataclasses.replace(
            self.stage_config, cut=dataclasses.replace(self.stage_config.cut, p=cfg.p_at(epoch))
        )
        for member in self.members:
            member.loader.set_epoch(epoch)
            member.loader.stage.config = stage  # this epoch's cut probability (a ramp, or `p` throughout)
            member.loader.stats.reset()
            member.model.train()
        iterators = [member.loader.batches(keep_clean=cfg.pair) for member in self.members]
        # Shards may differ by a sample, hence by a batch: every rank stops at the shortest (DDP needs lockstep).
        steps = self.runtime.all_min(len(self.members[0].loader), self.device)
        harvest_time, losses, gathered = 0.0, [], 0  # gathered: cache bytes received at mid-epoch checkpoints
        start = time.perf_counter()
        window = StepWindow(self, epoch, steps, start)
        first, carried = 0, self.resume_progress
        if carried is not None:  # a mid-epoch checkpoint: replay the loader to where it stopped, and its sums
            self.resume_progress, first = None, carried["step"]
            for iterator in iterators:
                for _ in range(first):  # the same draws as the first pass (loader and stage generators)
                    next(iterator)
            harvest_time, start = carried["harvest_s"], start - carried["elapsed"]
            window.restore(carried["window"], carried["images"], carried["wait"])
        bar = progress(total=steps * len(self.members), desc=f"epoch {epoch}", unit="img", unit_scale=cfg.batch_size)
        bar.update(first * len(self.members))
        check_every = 1 if self.device.type == "cpu" else 25  # reading a loss syncs the GPU
        for step in range(first, steps):
            fetched = []  # (batch, seconds waited for it), per member of this rank
            for iterator in iterators:
                fetch = time.perf_counter()
                batch = next(iterator)
                fetched.append((batch, time.perf_counter() - fetch))
            inputs = [self._inputs(member, batch) for member, (batch, _) in zip(self.members, fetched, strict=True)]
            peers = self._peer_maps(inputs) if cfg.diversity_loss > 0 else {}
            for member, (batch, waited), step_inputs in zip(self.members, fetched, inputs, strict=True):
                loss, forwarded, harvest_s = self._step(member, batch, step_inputs, harvest, peers.get(member.index))
                harvest_time += harvest_s
                losses.append(loss.detach())
                window.add(member.index, loss.detach(), forwarded, waited)
                bar.update(1)
            if (step + 1) % check_every == 0 or step + 1 == steps:
                check_finite(losses, self.members, epoch, step)
                bar.set_postfix(loss=f"{float(losses[-1]):.3f}", refresh=False)
                losses.clear()
            if (step + 1) % window.every == 0 or step + 1 == steps:
                window.close(step)
            if step + 1 < steps and self._checkpoint_due(step + 1):
                # The maps every rank harvested so far this epoch, into every rank's pending buffer: the checkpoint
                # rank 0 writes holds them all (without this, a resumed multi-process harvest run lost the other
                # ranks' maps of the epoch's first steps).
                gathered += self._sync_harvest()[1]
                # Each rank's own running sums (its members' losses, its images and waits), in rank order.
                progress_state = self.runtime.all_gather_objects(
                    dict(
                        images=window.images,
                        wait=window.wait,
                        harvest_s=harvest_time,
                        elapsed=time.perf_counter() - start,
                        window=window.state(),
                    )
                )
                with writing(f"the checkpoint of step {step + 1} of epoch {epoch} in {self.run_dir}"):
                    self.save_checkpoint(epoch, step + 1, progress_state)
                if self.stop_signal is not None:
                    raise Preempted(signal.Signals(self.stop_signal).name, self.checkpoint_note())
        elapsed = time.perf_counter() - start
        bar.close()
        for iterator in iterators:
            iterator.close()
        for member in self.members:  # one model per member from here on: the one the checkpoint holds
            self.runtime.broadcast_buffers(member.net, member.index, self.layout)
        record = epoch_record(self.members, self.runtime, self.device, window.images, window.wait, elapsed)
        if harvest:
            record["time/harvest_ms_per_step"] = 1e3 * harvest_time / (steps * len(self.members))
        if self.runtime.distributed:
            record["dist/cache_bytes_received"] = gathered
        return record

    def _checkpoint_due(self, done: int) -> bool:
        """After `done` steps of an epoch: write a mid-epoch checkpoint (every --checkpoint-every steps, when
        --checkpoint-minutes have passed since the last, or because a stop signal came; every rank agrees on the
        last two, so all checkpoint at the same step)."""
        stop = self.stop_signal is not None
        minutes = self.cfg.checkpoint_minutes
        timely = minutes is not None and time.monotonic() - self._checkpointed_at >= 60 * minutes
        if self.runtime.distributed:  # one all-reduce per step: signals and clocks differ between ranks
            stop, timely = (flag > 0 for flag in self.runtime.all_sum([float(stop), float(timely)], self.device))
            if stop and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM  # a peer's signal
        every = self.cfg.checkpoint_every
        return stop or timely or (every is not None and done % every == 0)

    def _inputs(self, member, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels `member` steps on: `batch`, with the cut samples' clean views joined (--pair)."""
        images, labels = batch.images, batch.labels
        if self.cfg.pair:  # every cut sample's clean view joins the step
            was_cut = member.loader.stats.last > 0  # (B,) erased fraction of this member's latest batch
            images, labels = torch.cat([images, batch.clean[was_cut]]), torch.cat([labels, labels[was_cut]])
        if self.amp:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def _peer_maps(self, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, list[torch.Tensor]]:
        """--diversity-loss: each member's peers' CAMs on its step inputs (`_inputs`, per member of this rank),
        made before any member steps, from the peers wherever they train (train/diversity.py)."""
        with self._autocast():
            return exchange_peer_cams(
                {member.index: member.net for member in self.members},
                {member.index: step for member, step in zip(self.members, inputs, strict=True)},
                self.layout.shard_id,
                self.cfg.ensemble,
                self.layer,
                self.runtime.all_gather_objects if self.runtime.distributed else None,
            )

    def _step(self, member, batch, inputs, harvest: bool, peers: list[torch.Tensor] | None = None):
        """One optimiser step of `member` on `inputs` (`_inputs` of `batch`: the cut samples' clean views joined
        under --pair), with the diversity penalty against `peers` (their maps of these inputs) added, and maps of
        `batch` harvested, as configured. Returns (the loss, images forwarded, seconds spent harvesting)."""
        cfg, diverse = self.cfg, peers is not None
        images, labels = inputs
        capture = ActivationCapture(member.net, self.layer, keep_graph=diverse) if harvest or diverse else nullcontext()
        with self._autocast(), capture:
            logits = member.model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            if diverse:
                own = class_cams(capture.activations, member.net.fc.weight, labels)
                loss = loss + cfg.diversity_loss * similarity(own, peers)
        member.optimizer.zero_grad(set_to_none=True)
        member.scaler.scale(loss).backward()
        member.scaler.step(member.optimizer)
        member.scaler.update()
        member.scheduler.step()
        harvest_s = 0.0
        if harvest:
            mark = time.perf_counter()
            views = slice(0, len(batch.labels))  # the maps of the training views, not of the clean pairs
            self._harvest(member, capture.activations[views].detach(), logits[views], batch)
            harvest_s = time.perf_counter() - mark
        return loss, len(labels), harvest_s

    # -- evaluation --------------------------------------------------------------------------------------

    def evaluate(self, split: str) -> tuple[dict, torch.Tensor]:
        """Every member on all of `split` ("val" or "test"): (metrics keyed `<split>/...`, logits (K, N, classes))."""
        return self.evaluator.scores(split, self.val_set if split == "val" else self.test_set)

    def sample_images(self) -> torch.Tensor | None:
        return figures.sample_images(
            self.train_set, self.loader_config, self.cache, self.stage_config, self.cfg.sample_grid
        )

    # -- the run -----------------------------------------------------------------------------------------

    def run(self, progress=None) -> dict:
        """Train every remaining epoch; rank 0 holds the run directory's lock throughout. SIGTERM or SIGUSR1 stops
        the run after the current step with a checkpoint there (Preempted)."""
        lock = RunDirectoryLock(self.run_dir).acquire() if self.runtime.is_main else None
        previous = self._catch_stop_signals()
        try:
            return self._run(progress if (progress and self.runtime.is_main) else NoProgress)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if lock is not None:
                lock.release()

    def _catch_stop_signals(self) -> dict:
        """Note SIGTERM / SIGUSR1 instead of dying (the loop checks after each step); returns the old handlers.
        A second signal during the checkpoint write changes nothing: the writes are atomic and already under way."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # only the main thread may set handlers (a run started from a worker thread keeps them)

        def note(signum, _frame):
            self.stop_signal = signum

        return {signum: signal.signal(signum, note) for signum in STOP_SIGNALS}

    def _run(self, progress) -> dict:
        cfg, main = self.cfg, self.runtime.is_main
        if main:
            check_run_dir(cfg)
        self.runtime.barrier()  # the run directory exists (or the refusal was raised) before anyone reads it
        if cfg.resume and self.load_checkpoint():
            self.log(f"resuming {self.run_dir} at epoch {self.start_epoch}")
        elif cfg.resume:
            self.log(f"--resume: {self.run_dir} holds no checkpoint yet; starting the run from epoch 0")
        if self.start_epoch == 0 and cfg.init_from is not None:
            self.log(f"initialised from {cfg.init_from} (its epoch {self.init_from(cfg.init_from)})")
        tracker = None
        if main:  # one metrics log and one W&B run per training run
            with writing(f"{self.run_dir / 'config.yaml'}"):
                record_run(cfg)
            with writing(f"{self.run_dir / 'metrics.jsonl'}"):
                tracker = Tracker(
                    self.run_dir, cfg.to_dict(), cfg.wandb, cfg.wandb_project, cfg.run_name, self.history, self.steps
                )
            self.history, self.steps, self._log_step = tracker.history, tracker.steps, tracker.log_step
        try:
            if self.start_epoch == 0 and self.resume_progress is None and self._refresh_due(0):
                self.refresh(epoch=-1)
            for epoch in range(self.start_epoch, cfg.epochs):
                self._epoch(epoch, progress, tracker)
                if self.stop_signal is not None and epoch + 1 < cfg.epochs:  # came after the epoch's last step
                    raise Preempted(signal.Signals(self.stop_signal).name, self.checkpoint_note())
            if main:
                with writing(f"{self.run_dir / 'cache.gsc'}"):
                    self.cache.save(self.run_dir / "cache.gsc")  # the final maps, for anyone to load
                figures.write_figures(self.run_dir, self.history, cfg.ensemble, self.sample_images(), self.steps)
        finally:
            if tracker is not None:
                tracker.finish()
        return self.history[-1] if self.history else {}

    def _epoch(self, epoch: int, progress, tracker: Tracker | None) -> None:
        started = time.perf_counter() if self._boundary is None else self._boundary
        record = {"epoch": epoch, **self.train_epoch(epoch, progress)}
        refresh_s, received = self.refresh(epoch) if self._refresh_due(epoch + 1) else self._sync_harvest()
        record["time/refresh_s"] = refresh_s
        if self.runtime.distributed:
            record["dist/cache_bytes_received"] += received
        evaluating = time.perf_counter()
        last = epoch == self.cfg.epochs - 1
        if last or (epoch + 1) % self.cfg.eval_every == 0:
            metrics, logits = self.evaluate(self.eval_split)
            record.update(metrics)
        if last:
            record.update(self.evaluator.final({"val": self.val_set, "test": self.test_set}, self.eval_split, logits))
        self._boundary = time.perf_counter()
        record["time/eval_s"] = self._boundary - evaluating
        record["time/checkpoint_s"] = self._checkpoint_s  # the previous epoch's checkpoint write
        record["time/epoch_s"] = self._boundary - started  # from the previous epoch's last metric to this one's
        parts = ("train_s", "refresh_s", "eval_s", "checkpoint_s")
        record["time/other_s"] = record["time/epoch_s"] - sum(record[f"time/{part}"] for part in parts)
        record["time/run_s"] = record["time/epoch_s"] + (self.history[-1]["time/run_s"] if self.history else 0)
        if tracker is not None:
            grid = self.sample_images() if self.cfg.wandb != "disabled" else None
            with writing(f"{self.run_dir / 'metrics.jsonl'}", self.checkpoint_note()):
                tracker.log(record, images={"samples": grid.numpy()} if grid is not None else None)
        else:
            self.history.append(record)
        writing_checkpoint = time.perf_counter()
        with writing(f"the checkpoint of epoch {epoch} in {self.run_dir}", self.checkpoint_note()):
            self.save_checkpoint(epoch)
        self._checkpoint_s = time.perf_counter() - writing_checkpoint
        self.log(epoch_line(record, self.cfg.ensemble))
