"""The ensemble trainer: K members, a shared saliency cache, a refresh each epoch, metrics, exact resume.

Each epoch: the members train interleaved (one step each, in turn), each on batches cut with its peers'
maps from the cache; then the refresh (a Grad-CAM pass over the training set, or the maps harvested from the
training forwards) is published, so epoch e + 1 cuts with epoch e's maps; then every member is evaluated,
the ensemble metrics are logged, and an atomic checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from gutout import ActivationCapture, GutoutStage, SaliencyCache, StageConfig, cam_from_activations, warp_to_canonical
from gutout.atomic import atomic_write_bytes, atomic_writer
from gutout.cache import CacheSnapshotError, check_header
from gutout.config import ConfigError
from gutout.gradcam import default_layer, preserved_modes
from gutout.pipelines import ArrayDataset, GutoutLoader, LoaderConfig, make_source
from gutout.pipelines.datasets import (
    class_mismatch,
    load_cifar,
    load_fashion_mnist,
    load_folder,
    stratified_split,
)
from gutout.pipelines.normalise import resolve_stats

from .config import SALIENCY_POLICIES, TrainConfig, identity_differences, read_run_config
from .distributed import Runtime, plan_layout
from .evaluation import OCCLUSIONS, Evaluator
from .figures import sample_grid, save_curves, save_png
from .metrics import ensemble_log_probs, ensemble_metrics, fit_temperature, temperature_scaled
from .models import build_model
from .rundir import ResumeMismatch, RunDirectoryLock, writing
from .tracking import Tracker

CHECKPOINT = "checkpoint.pt"


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Member:
    index: int
    model: torch.nn.Module  # what trains: the network, or its DistributedDataParallel wrapper
    net: torch.nn.Module  # the network itself (Grad-CAM hooks and checkpoints use it)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # AMP loss scale, per member: one member's overflow must not skip another's step
    loader: GutoutLoader


# -- data ------------------------------------------------------------------------------------------------


# The validation split's draw has a seed of its own, not the run's: every seed and configuration of a comparison is
# validated on the same samples, and each run's --subset is drawn from the samples left for training.
VALIDATION_SEED = 0x5EED


class Splits(NamedTuple):
    train: object
    val: object | None  # held out of the training set (--val-split), or None
    test: object


def load_datasets(cfg: TrainConfig) -> Splits:
    """The splits; `val_split` samples held out of the training set (stratified, seeded by VALIDATION_SEED), and
    the rest cut to a subset seeded by the run's seed when `subset` is set."""
    if cfg.dataset == "fashion-mnist":
        train, test = load_fashion_mnist("train", cfg.data), load_fashion_mnist("test", cfg.data)
    elif cfg.dataset in ("cifar10", "cifar100"):
        if cfg.data is None:
            raise ConfigError(f"dataset {cfg.dataset!r} needs --data (the official python-pickle folder)")
        train, test = load_cifar(cfg.dataset, "train", cfg.data), load_cifar(cfg.dataset, "test", cfg.data)
    else:
        root = Path(cfg.data)
        train = load_folder(root / "train", skip_corrupt=cfg.skip_corrupt, name=cfg.dataset)
        test = load_folder(root / "val", skip_corrupt=cfg.skip_corrupt, name=cfg.dataset)
        mismatch = class_mismatch(train, test)
        if mismatch:
            raise ConfigError(mismatch)
    val, pool = None, torch.arange(len(train))  # pool: the positions training may use
    if cfg.val_split:
        if cfg.val_split >= len(train):
            raise ConfigError(f"--val-split {cfg.val_split} leaves none of the {len(train)} training samples of "
                              f"{cfg.dataset} to train on")  # fmt: skip
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


def resolve_backend(cfg: TrainConfig, dataset) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    if isinstance(dataset, ArrayDataset):
        return "tensor"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "torch"
    return "dali"


def resolve_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    """The device of this process: its local GPU (one per rank) or the CPU."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available here; use --device cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@functools.cache
def git_revision() -> str:
    """The commit of the source tree this process runs, "+dirty" when it had uncommitted changes; "unknown"
    outside a git checkout. Asked once per process, when its first run starts (its code is loaded by then):
    in a long `compare`, later commits are not this code."""
    here = Path(__file__).resolve().parent
    try:
        # Installed inside some other repository (a venv in a project), HEAD would be that project's.
        ours = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], capture_output=True,
                              timeout=10, cwd=here)  # fmt: skip
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        if ours.returncode != 0 or head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10, cwd=here.parent)  # fmt: skip
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- the trainer -----------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print, runtime: Runtime | None = None):
        self.runtime = runtime or Runtime()
        if self.runtime.restarted and not cfg.resume:  # torchrun restarted the workers: continue the run
            cfg = dataclasses.replace(cfg, resume=True)
        self.cfg = cfg
        self.log = log if self.runtime.is_main else (lambda *args, **kwargs: None)
        self.device = resolve_device(cfg, self.runtime.local_rank)
        self.runtime.start(self.device)
        self.layout = plan_layout(cfg.ensemble, self.runtime.world, self.runtime.rank)
        self.runtime.member_groups(self.layout, cfg.ensemble)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.run_dir = cfg.run_dir
        self.train_set, self.val_set, self.test_set = load_datasets(cfg)
        self.eval_split = "val" if self.val_set is not None else "test"  # what every epoch is scored on
        self.backend = resolve_backend(cfg, self.train_set)
        self.num_classes = len(self.train_set.classes)
        self.mean, self.std = resolve_stats(self.train_set, LoaderConfig())
        image_size = (
            cfg.image_size if cfg.image_size is not None else (224 if cfg.dataset in ("imagenet", "folder") else None)
        )
        self.loader_config = LoaderConfig(
            batch_size=cfg.batch_size, image_size=image_size, mean=self.mean, std=self.std, seed=cfg.seed,
            device=str(self.device), backend=self.backend, num_threads=cfg.num_threads, half=self.amp,
            shard_id=self.layout.shard_id, num_shards=self.layout.group_size,  # the member group's shard
        )  # fmt: skip
        self.members: list[Member] = []
        self.layer, self.map_size = self._probe_layer()
        self.cache = SaliencyCache(
            cfg.ensemble, len(self.train_set), self.map_size, device=self.device,
            fingerprint=self.train_set.fingerprint, layer=self.layer, target=cfg.target,
        )  # fmt: skip
        self.stage_config = StageConfig.from_flat(cfg.stage_options())
        for m in self.layout.members:
            self.members.append(self._make_member(m, self.stage_config))
        self.evaluator = Evaluator(
            {m.index: m.net for m in self.members}, cfg.ensemble, self.num_classes,
            dataclasses.replace(self.loader_config, batch_size=cfg.eval_batch_size), self.runtime.all_gather_rows,
            self._autocast, self.layer, channels_last=self.amp,
        )  # fmt: skip
        self.history: list[dict] = []
        self.start_epoch = 0
        self.checkpointed_epoch: int | None = None  # the last epoch whose checkpoint is complete on disk

    # -- construction ------------------------------------------------------------------------------------

    def _new_model(self, member: int) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed * 1000 + member)  # each member its own initialisation
        model = build_model(self.cfg.model_name, self.num_classes, self.train_set.channels, self.cfg.width)
        model = model.to(self.device)
        if self.amp:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _probe_layer(self) -> tuple[str, tuple[int, int]]:
        """The Grad-CAM layer (last convolutional stage) and its output grid: the cache's map size."""
        model = self._new_model(0)
        probe_config = dataclasses.replace(self.loader_config, batch_size=2, half=False)
        images = next(iter(make_source(self.train_set, "refresh", probe_config))).images.float()
        layer = default_layer(model, images)
        with preserved_modes(model), torch.no_grad(), ActivationCapture(model, layer) as capture:
            model.eval()
            model(images)
        return layer, tuple(capture.activations.shape[-2:])

    def _make_member(self, m: int, stage: StageConfig) -> Member:
        cfg = self.cfg
        model = self._new_model(m)
        decay, no_decay = [], []
        for param in model.parameters():
            (no_decay if param.ndim <= 1 else decay).append(param)  # no weight decay on BN and biases
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
        )  # fmt: skip
        member_config = dataclasses.replace(self.loader_config, seed=cfg.seed * 1000 + m)  # its own augmentation
        loader = GutoutLoader(self.train_set, member_config, stage, cache=self.cache, member=m)
        steps = len(loader) * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(steps, len(loader)))
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        wrapped = model
        if self.layout.group_size > 1:  # this member trains on several ranks: average its gradients
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                process_group=self.runtime.groups[m],
            )  # fmt: skip
        return Member(m, wrapped, model, optimizer, scheduler, scaler, loader)

    def _lr_lambda(self, total_steps: int, steps_per_epoch: int):
        cfg = self.cfg
        warmup = max(1, round(0.02 * total_steps))  # a short linear warm-up steadies the first steps
        # Default decays at 50 % and 75 % of the run (halves rounded up), never at epoch 0, each once.
        milestones = cfg.milestones or sorted({max(1, math.floor(f * cfg.epochs + 0.5)) for f in (0.5, 0.75)})

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup)
            if cfg.schedule == "cosine":
                return ramp * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
            epoch = step // steps_per_epoch
            return ramp * cfg.lr_decay ** sum(epoch >= m for m in milestones)

        return factor

    # -- checkpoints -------------------------------------------------------------------------------------

    def common_state(self, epoch: int) -> dict:
        """What every rank shares: written last, by rank 0, it marks the checkpoint of `epoch` complete."""
        return {
            "config": self.cfg.identity(),
            "epoch": epoch,
            "cache_header": self._cache_identity(),
            "cache": {"maps": self.cache.maps.cpu(), "valid": self.cache.valid.cpu(), "epoch": self.cache.epoch,
                      "pending_maps": self.cache._pending_maps.cpu(), "pending_valid": self.cache._pending_valid.cpu()},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "history": self.history,
        }  # fmt: skip

    def member_path(self, member: int, epoch: int) -> Path:
        return self.run_dir / f"member-{member}.epoch-{epoch}.pt"

    def save_checkpoint(self, epoch: int) -> None:
        """Member files first (by each member group's first rank), then the common file (rank 0), atomically
        each: a run killed at any moment resumes from the last epoch whose common file was written."""
        if self.layout.group_leader:
            for m in self.members:
                state = {"model": m.net.state_dict(), "optimizer": m.optimizer.state_dict(), "epoch": epoch,
                         "scheduler": m.scheduler.state_dict(), "scaler": m.scaler.state_dict()}  # fmt: skip
                with atomic_writer(self.member_path(m.index, epoch)) as f:
                    torch.save(state, f)
        self.runtime.barrier()
        if self.runtime.is_main:
            with atomic_writer(self.run_dir / CHECKPOINT) as f:
                torch.save(self.common_state(epoch), f)
            self.checkpointed_epoch = epoch  # complete from the rename on, whatever interrupts what follows
            self.cache.save(self.run_dir / "cache.gsc")
            for old in self.run_dir.glob("member-*.epoch-*.pt"):  # earlier epochs are superseded now
                if int(old.name.split(".epoch-")[1].split(".")[0]) < epoch:
                    old.unlink(missing_ok=True)
        self.runtime.barrier()
        self.checkpointed_epoch = epoch

    def init_from(self, run_dir: str | Path) -> int:
        """Start every local member from the weights of another run's last complete checkpoint (a new run: fresh
        optimiser, schedule and maps). Returns that checkpoint's epoch."""
        run_dir = Path(run_dir)
        try:
            epoch = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["epoch"]
        except FileNotFoundError:
            raise ConfigError(
                f"--init-from {run_dir}: no {CHECKPOINT} there (not a run, or none checkpointed)"
            ) from None
        except Exception as err:  # noqa: BLE001 - a damaged file, named
            raise ConfigError(f"--init-from {run_dir}: cannot read {run_dir / CHECKPOINT}: {err}") from None
        for member in self.members:
            path = run_dir / f"member-{member.index}.epoch-{epoch}.pt"
            if not path.exists():
                raise ConfigError(f"--init-from {run_dir}: no weights for member {member.index} ({path.name}); "
                                  "it must have at least as many members as --ensemble")  # fmt: skip
            try:
                member.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
            except Exception as err:  # noqa: BLE001 - another model or class count: say which file
                raise ConfigError(f"--init-from {run_dir}: {path.name} does not fit {self.cfg.model_name}: "
                                  f"{str(err).splitlines()[0]}") from None  # fmt: skip
        return epoch

    def checkpoint_note(self) -> str:
        """Where a stopped run can continue from, for the message that says it stopped."""
        if self.checkpointed_epoch is None:
            return f"no epoch of {self.run_dir} was checkpointed yet"
        return (f"the checkpoint of epoch {self.checkpointed_epoch} in {self.run_dir} is complete; continue with "
                "--resume")  # fmt: skip

    def _cache_identity(self) -> dict:
        """What the checkpointed maps belong to: the training samples (fingerprint), the maps' layout."""
        header = self.cache.header()
        return {k: header[k] for k in ("fingerprint", "samples", "map_size", "members", "layer", "target")}

    def load_checkpoint(self) -> bool:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is named, not silently ignored
            raise ResumeMismatch(f"cannot read checkpoint {path}: {err}") from None
        differences = identity_differences(state["config"], self.cfg.identity())
        diffs = [f"{k}: checkpoint has {theirs!r}, this run has {mine!r}" for k, theirs, mine in differences]
        if diffs:
            hint = ""
            if any(k == "epochs" for k, _, _ in differences):
                hint = (". --resume continues the same schedule, which the number of epochs shapes; to train on "
                        f"from this run, start a new one initialised from it: --init-from {self.run_dir} "
                        "--name <another name>")  # fmt: skip
            raise ResumeMismatch(f"{path} belongs to a different run; refusing to resume: " + "; ".join(diffs) + hint)
        if "cache_header" in state:  # written since the fingerprint check; older checkpoints lack it
            try:
                check_header(state["cache_header"], self._cache_identity(), source=str(path))
            except CacheSnapshotError as err:  # e.g. the folder's files changed under the same path
                raise ResumeMismatch(f"{err}; refusing to resume with maps of other samples") from None
        epoch = state["epoch"]
        for member in self.members:
            member_file = self.member_path(member.index, epoch)
            if not member_file.exists():
                raise ResumeMismatch(f"checkpoint of epoch {epoch} is incomplete: {member_file} is missing")
            try:
                saved = torch.load(member_file, map_location="cpu", weights_only=False)
            except Exception as err:  # noqa: BLE001 - a damaged file is named, not a bare unpickling error
                raise ResumeMismatch(f"cannot read checkpoint {member_file}: {err}") from None
            member.net.load_state_dict(saved["model"])
            member.optimizer.load_state_dict(saved["optimizer"])
            member.scheduler.load_state_dict(saved["scheduler"])
            member.scaler.load_state_dict(saved["scaler"])
        cache = state["cache"]
        self.cache.maps.copy_(cache["maps"])
        self.cache.valid.copy_(cache["valid"])
        self.cache._pending_maps.copy_(cache["pending_maps"])
        self.cache._pending_valid.copy_(cache["pending_valid"])
        self.cache.epoch = cache["epoch"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.history = state["history"]
        self.start_epoch = epoch + 1
        self.checkpointed_epoch = epoch
        return True

    # -- one epoch ---------------------------------------------------------------------------------------

    def _refresh_due(self, boundary: int) -> bool:
        """Refresh at the boundary before epoch `boundary` (0 = before training)?"""
        cfg = self.cfg
        if cfg.policy not in SALIENCY_POLICIES or boundary >= cfg.epochs:
            return False  # baselines read no maps; after the last epoch nobody would read them
        return boundary >= cfg.warmup_epochs and (boundary - cfg.warmup_epochs) % cfg.refresh_every == 0

    def refresh(self, epoch: int) -> tuple[float, int]:
        """Publish fresh maps for the next epoch: this rank's members on this rank's shard, then the entries
        of every rank all-gathered. Returns (seconds spent, bytes this rank received)."""
        start = time.perf_counter()
        if self.cfg.refresh == "pass":
            for member in self.members:
                with self._autocast():
                    member.loader.refresh(member.net, self.layer, publish=False,
                                          batch_size=self.cfg.eval_batch_size)  # fmt: skip
        received = self.runtime.sync_cache(self.cache)
        self.cache.publish(epoch)
        return time.perf_counter() - start, received

    def _sync_harvest(self) -> tuple[float, int]:
        """An epoch end without a refresh: in a multi-process harvest run, all-gather the maps harvested this
        epoch now (unpublished), so that the checkpoint rank 0 writes holds every rank's maps and a sample
        harvested by another rank next epoch overwrites this one rather than racing it at the refresh."""
        if not (self.runtime.distributed and self.cfg.refresh == "harvest" and self.cfg.policy in SALIENCY_POLICIES):
            return 0.0, 0
        start = time.perf_counter()
        received = self.runtime.sync_cache(self.cache)
        self.cache.mark_synced()
        return time.perf_counter() - start, received

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16) if self.amp else nullcontext()

    def _harvest(self, member: Member, activations, logits, batch) -> None:
        """Harvest mode: this step's CAM (closed form from the forward's activations), back in the canonical
        frame, written where the crop saw the image."""
        targets = batch.labels if self.cfg.target == "label" else logits.detach().argmax(-1)  # (B,)
        cams = cam_from_activations(activations, member.net.fc.weight, targets)  # (B, h', w')
        maps, covered = warp_to_canonical(cams, batch.windows, batch.flips, self.map_size)
        self.cache.update(member.index, batch.indices, maps, covered=covered)

    def train_epoch(self, epoch: int, progress) -> dict:
        cfg = self.cfg
        harvest = cfg.refresh == "harvest" and cfg.policy in SALIENCY_POLICIES
        for member in self.members:
            member.loader.set_epoch(epoch)
            member.loader.stats.reset()
            member.model.train()
        iterators = [member.loader.batches() for member in self.members]
        # Shards may differ by a sample, hence by a batch: every rank stops at the shortest (DDP needs lockstep).
        steps = self.runtime.all_min(len(self.members[0].loader), self.device)
        images_seen, wait, harvest_time = 0, 0.0, 0.0
        start = time.perf_counter()
        bar = progress(total=steps * len(self.members), desc=f"epoch {epoch}", unit="img", unit_scale=cfg.batch_size)
        # Reading a loss syncs the GPU: check every step on the CPU, every 25 steps on CUDA.
        check_every = 1 if self.device.type == "cpu" else 25
        recent_losses: list[torch.Tensor] = []
        for step in range(steps):
            for member, iterator in zip(self.members, iterators, strict=True):
                fetch = time.perf_counter()
                batch = next(iterator)
                wait += time.perf_counter() - fetch
                images = batch.images.contiguous(memory_format=torch.channels_last) if self.amp else batch.images
                capture = ActivationCapture(member.net, self.layer) if harvest else nullcontext()
                with self._autocast(), capture:
                    logits = member.model(images)
                    loss = F.cross_entropy(logits.float(), batch.labels, label_smoothing=cfg.label_smoothing)
                member.optimizer.zero_grad(set_to_none=True)
                member.scaler.scale(loss).backward()
                member.scaler.step(member.optimizer)
                member.scaler.update()
                member.scheduler.step()
                if harvest:
                    mark = time.perf_counter()
                    self._harvest(member, capture.activations, logits, batch)
                    harvest_time += time.perf_counter() - mark
                images_seen += len(batch.labels)
                recent_losses.append(loss.detach())
                bar.update(1)
            if (step + 1) % check_every == 0 or step + 1 == steps:
                self._check_finite(recent_losses, epoch, step)
                bar.set_postfix(loss=f"{float(recent_losses[-1]):.3f}", refresh=False)
                recent_losses.clear()
        elapsed = time.perf_counter() - start
        bar.close()
        for iterator in iterators:
            iterator.close()
        for member in self.members:  # one model per member from here on: the one the checkpoint holds
            self.runtime.broadcast_buffers(member.net, member.index, self.layout)
        stats = [m.loader.stats for m in self.members]
        images_all, wait_all, erased_sum, erased_sq, erased_n = self.runtime.all_sum([
            images_seen, wait, sum(s.mean * s.samples for s in stats),
            sum((s.std**2 + s.mean**2) * s.samples for s in stats), sum(s.samples for s in stats),
        ], self.device)  # fmt: skip
        erased_mean = erased_sum / max(erased_n, 1)
        record = {
            "throughput/train_img_per_s": images_all / elapsed,  # every member on every rank
            "throughput/loader_wait_frac": wait_all / self.runtime.world / elapsed,
            "time/train_s": elapsed,
            "gutout/erased_frac": erased_mean,
            "gutout/erased_frac_std": max(erased_sq / max(erased_n, 1) - erased_mean**2, 0.0) ** 0.5,
            "lr": self.members[0].scheduler.get_last_lr()[0],
        }
        if harvest:
            record["time/harvest_ms_per_step"] = 1e3 * harvest_time / (steps * len(self.members))
        return record

    def _check_finite(self, losses: list[torch.Tensor], epoch: int, last_step: int) -> None:
        """Stop at the first non-finite loss among the steps since the last check, naming where it was."""
        stacked = torch.stack(losses).float().cpu()  # (steps * K,) in step-major, member-minor order
        bad = (~torch.isfinite(stacked)).nonzero()
        if len(bad):
            K = len(self.members)
            first = int(bad[0])
            step = last_step - (len(losses) // K - 1) + first // K
            member = self.members[first % K].index  # this rank's members are a subset of the ensemble
            raise NonFiniteLoss(
                f"non-finite loss ({float(stacked[first])}) for member {member} at epoch {epoch}, step {step}; "
                "lower --lr or check the data"
            )

    def evaluate(self, split: str) -> tuple[dict, torch.Tensor]:
        """Every member on all of `split` ("val" or "test"): (metrics keyed `<split>/...`, logits (K, N, classes))."""
        dataset = self._split_set(split)
        logits = self.evaluator.logits(dataset)
        return prefixed(split, ensemble_metrics(logits, dataset.labels)), logits

    def final_evaluation(self, eval_logits: torch.Tensor) -> dict:
        """At the end of the run: the test set, read once here when a validation split exists; calibration after
        temperature scaling (fitted on the validation split); occlusion robustness on every evaluated split."""
        record, splits = {}, {self.eval_split: (eval_logits, self._split_set(self.eval_split).labels)}
        if self.val_set is not None:
            metrics, test_logits = self.evaluate("test")
            record.update(metrics)
            splits["test"] = (test_logits, self.test_set.labels)
            val_logits, val_labels = splits["val"]
            temperature = fit_temperature(ensemble_log_probs(val_logits), val_labels)
            for split, (logits, labels) in splits.items():
                record.update(prefixed(split, temperature_scaled(temperature, logits, labels)))
        for split in splits:
            record.update(prefixed(split, self.evaluator.occlusion(self._split_set(split))))
        return record

    def _split_set(self, split: str):
        return self.val_set if split == "val" else self.test_set

    # -- figures -----------------------------------------------------------------------------------------

    def sample_images(self) -> torch.Tensor | None:
        """The sample grid: image, each member's saliency, each member's Gutout view (uint8 (H, W, 3))."""
        n = min(self.cfg.sample_grid, len(self.train_set))
        if n == 0:
            return None
        config = dataclasses.replace(self.loader_config, batch_size=n, shard_id=0, num_shards=1)
        batch = next(iter(make_source(self.train_set, "refresh", config)))
        maps = self.cache.maps[:, batch.indices.to(self.cache.device)]  # (K, n, h, w)
        views = []
        generator = torch.Generator().manual_seed(0)
        # Show every sample's cut (p = 1): the grid is for looking at what Gutout erases.
        shown = dataclasses.replace(self.stage_config, cut=dataclasses.replace(self.stage_config.cut, p=1.0))
        for m in range(self.cfg.ensemble):
            stage = GutoutStage(shown, self.cache, m)
            views.append(stage(batch.images.clone(), batch.indices, batch.windows, batch.flips, generator))
        return sample_grid(batch.images, maps, torch.stack(views), self.mean, self.std)

    def write_figures(self) -> list[Path]:
        paths = []
        grid = self.sample_images()
        if grid is not None:
            save_png(grid, self.run_dir / "samples.png")
            paths.append(self.run_dir / "samples.png")
        save_curves(self.history, self.cfg.ensemble, self.run_dir / "curves.png")
        if (self.run_dir / "curves.png").exists():
            paths.append(self.run_dir / "curves.png")
        return paths

    # -- the run -----------------------------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        """Refuse a directory that holds a run (from the moment that run started: its config.yaml) unless this is
        its --resume; a --resume of a run stopped before its first checkpoint must be the same configuration."""
        if not self.runtime.is_main:
            return
        config = self.run_dir / "config.yaml"
        if not self.cfg.resume:
            if (self.run_dir / CHECKPOINT).exists() or config.exists():
                raise ResumeMismatch(
                    f"{self.run_dir} already holds a run; pass --resume to continue it, or choose another --name/--out"
                )
        elif config.exists() and not (self.run_dir / CHECKPOINT).exists():
            try:
                saved = read_run_config(self.run_dir).identity()
            except Exception as err:  # noqa: BLE001 - unreadable YAML or a config of another version, named
                raise ResumeMismatch(f"cannot read {config}: {err}; refusing to resume") from None
            diffs = [f"{k}: that run has {theirs!r}, this one {mine!r}"
                     for k, theirs, mine in identity_differences(saved, self.cfg.identity())]  # fmt: skip
            if diffs:
                raise ResumeMismatch(f"{self.run_dir} holds another run; refusing to resume: " + "; ".join(diffs))

    def record_run(self) -> None:
        """config.yaml and git-revision: written once the run directory is known to hold this run (after a
        resume's checks), so that a refused --resume leaves the directory as it was."""
        if not self.runtime.is_main:
            return
        import yaml

        atomic_write_bytes(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=True).encode())
        atomic_write_bytes(self.run_dir / "git-revision", (git_revision() + "\n").encode())

    def run(self, progress=None) -> dict:
        """Train every remaining epoch; rank 0 holds the run directory's lock throughout."""
        lock = RunDirectoryLock(self.run_dir) if self.runtime.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            return self._run(progress)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, progress) -> dict:
        cfg, main = self.cfg, self.runtime.is_main
        progress = progress if (progress and main) else _no_progress
        self.prepare_run_dir()
        self.runtime.barrier()  # the run directory exists (or the refusal was raised) before anyone reads it
        if cfg.resume:
            if self.load_checkpoint():
                self.log(f"resuming {self.run_dir} at epoch {self.start_epoch}")
            else:
                self.log(f"--resume: {self.run_dir} holds no checkpoint yet; starting the run from epoch 0")
        if self.start_epoch == 0 and cfg.init_from is not None:
            source_epoch = self.init_from(cfg.init_from)
            self.log(f"initialised from {cfg.init_from} (its epoch {source_epoch})")
        with writing(f"{self.run_dir / 'config.yaml'}"):
            self.record_run()
        tracker = None
        if main:  # one metrics log and one W&B run per training run
            with writing(f"{self.run_dir / 'metrics.jsonl'}"):
                tracker = Tracker(self.run_dir, cfg.to_dict(), cfg.wandb, cfg.wandb_project, cfg.run_name,
                                  self.history)  # fmt: skip
            self.history = tracker.history
        try:
            if self.start_epoch == 0 and self._refresh_due(0):
                self.refresh(epoch=-1)
            for epoch in range(self.start_epoch, cfg.epochs):
                started = time.perf_counter()
                record = {"epoch": epoch}
                record.update(self.train_epoch(epoch, progress))
                refresh_s, received = self.refresh(epoch) if self._refresh_due(epoch + 1) else self._sync_harvest()
                record["time/refresh_s"] = refresh_s
                if self.runtime.distributed:
                    record["dist/cache_bytes_received"] = received
                metrics, logits = self.evaluate(self.eval_split)
                record.update(metrics)
                if epoch == cfg.epochs - 1:
                    record.update(self.final_evaluation(logits))
                record["time/epoch_s"] = time.perf_counter() - started  # training to the last metric, per epoch
                record["time/run_s"] = record["time/epoch_s"] + (self.history[-1]["time/run_s"] if self.history else 0)
                if main:
                    grid = self.sample_images() if cfg.wandb != "disabled" else None
                    with writing(f"{self.run_dir / 'metrics.jsonl'}", self.checkpoint_note()):
                        tracker.log(record, images={"samples": grid.numpy()} if grid is not None else None)
                else:
                    self.history.append(record)
                with writing(f"the checkpoint of epoch {epoch} in {self.run_dir}", self.checkpoint_note()):
                    self.save_checkpoint(epoch)
                self.log(_epoch_line(record, cfg.ensemble))
            if main:
                self.write_figures()
        finally:
            if tracker is not None:
                tracker.finish()
        return self.history[-1] if self.history else {}


def prefixed(split: str, metrics: dict) -> dict:
    """Metric keys under the split they were computed on: `val/ensemble/acc`, `test/member/0/nll`."""
    return {f"{split}/{key}": value for key, value in metrics.items()}


def eval_split(record: dict) -> str:
    """The split a record's per-epoch metrics were computed on."""
    return "val" if "val/ensemble/acc" in record else "test"


def _epoch_line(record: dict, members: int) -> str:
    split = eval_split(record)
    accs = " ".join(f"{100 * record[f'{split}/member/{m}/acc']:.2f}" for m in range(members))
    return (
        f"epoch {record['epoch']}: {split} members {accs} | ensemble {100 * record[f'{split}/ensemble/acc']:.2f}% "
        f"| disagreement {100 * record[f'{split}/ensemble/disagreement']:.1f}% "
        f"| erased {100 * record['gutout/erased_frac']:.1f}% "
        f"| {record['throughput/train_img_per_s']:.0f} img/s | refresh {record['time/refresh_s']:.1f} s"
    )


class _no_progress:  # noqa: N801 - a drop-in for tqdm's constructor
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def summary_table(record: dict, members: int) -> str:
    """The end-of-run summary as a Markdown table: the test set, and the validation split when there is one."""
    splits = [s for s in ("val", "test") if f"{s}/ensemble/acc" in record]
    head = "| model | " + " | ".join(f"{s} acc (%) | {s} NLL" for s in splits) + " |"
    lines = [head, "|---|" + "---|---|" * len(splits)]
    for name, key in [(f"member {m}", f"member/{m}") for m in range(members)] + [("ensemble", "ensemble")]:
        cells = [f"{100 * record[f'{s}/{key}/acc']:.2f} | {record[f'{s}/{key}/nll']:.3f}" for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    final = splits[-1]
    occluded = " / ".join(f"{100 * record[f'{final}/ensemble/occlusion/{o}_acc']:.1f}" for o in OCCLUSIONS)
    lines += [
        "",
        f"{final}: ensemble ECE {100 * record[f'{final}/ensemble/ece']:.2f}%"
        + (f" ({100 * record[f'{final}/ensemble/ece_ts']:.2f}% after temperature scaling)"
           if f"{final}/ensemble/ece_ts" in record else "")
        + f" | disagreement {100 * record[f'{final}/ensemble/disagreement']:.2f}%"
        f" | occluded acc random / salient / salient box {occluded}%",
        f"erased fraction {100 * record['gutout/erased_frac']:.1f}% "
        f"| {record['throughput/train_img_per_s']:.0f} train img/s (all members) "
        f"| loader wait {100 * record['throughput/loader_wait_frac']:.1f}% | {record['time/run_s']:.0f} s in all",
    ]  # fmt: skip
    return "\n".join(lines)


def tqdm_progress(enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _no_progress
    from tqdm import tqdm

    return tqdm
