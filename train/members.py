"""The ensemble's members: each a network, its optimiser, learning-rate schedule and AMP scaler, and its loader."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gutout import ActivationCapture, SaliencyCache, StageConfig
from gutout.gradcam import default_layer, preserved_modes
from gutout.pipelines import GutoutLoader, LoaderConfig, make_source

from .config import TrainConfig
from .distributed import Layout, Runtime
from .models import build_model


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


def new_model(cfg: TrainConfig, member: int, classes: int, channels: int, device, channels_last: bool):
    torch.manual_seed(cfg.seed * 1000 + member)  # each member its own initialisation
    model = build_model(cfg.model_name, classes, channels, cfg.width).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def probe_layer(model: torch.nn.Module, dataset, config: LoaderConfig) -> tuple[str, tuple[int, int]]:
    """The Grad-CAM layer (the last convolutional stage) and its output grid: the cache's map size."""
    images = next(iter(make_source(dataset, "refresh", dataclasses.replace(config, batch_size=2, half=False))))
    images = images.images.float()
    layer = default_layer(model, images)
    with preserved_modes(model), torch.no_grad(), ActivationCapture(model, layer) as capture:
        model.eval()
        model(images)
    return layer, tuple(capture.activations.shape[-2:])


def lr_schedule(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor of each step: a 2 % linear warm-up, then cosine to zero or multistep decays."""
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


def build_member(
    cfg: TrainConfig,
    m: int,
    model: torch.nn.Module,
    dataset,
    config: LoaderConfig,
    stage: StageConfig,
    cache: SaliencyCache,
    layout: Layout,
    runtime: Runtime,
    amp: bool,
) -> Member:
    """Member `m` around its network: SGD with Nesterov momentum (no weight decay on BatchNorm and biases), its own
    augmentation stream, the schedule, the AMP scaler, and DDP over its group when it trains on several ranks."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    member_config = dataclasses.replace(config, seed=cfg.seed * 1000 + m)  # its own augmentation
    loader = GutoutLoader(dataset, member_config, stage, cache=cache, member=m)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, len(loader) * cfg.epochs, len(loader)))
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    wrapped = model
    if layout.group_size > 1:  # this member trains on several ranks: average its gradients
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, process_group=runtime.groups[m]
        )
    return Member(m, wrapped, model, optimizer, scheduler, scaler, loader)


def check_finite(losses: list[torch.Tensor], members: list[Member], epoch: int, last_step: int) -> None:
    """Stop at the first non-finite loss among the steps since the last check, naming the member, epoch and step.
    `losses` are step-major, member-minor: one per member of `members` (this rank's) per step up to `last_step`."""
    stacked = torch.stack(losses).float().cpu()
    bad = (~torch.isfinite(stacked)).nonzero()
    if len(bad):
        K, first = len(members), int(bad[0])
        step = last_step - (len(losses) // K - 1) + first // K
        raise NonFiniteLoss(
            f"non-finite loss ({float(stacked[first])}) for member {members[first % K].index} at epoch {epoch}, "
            f"step {step}; lower --lr or check the data"
        )


def epoch_record(members: list[Member], runtime: Runtime, device, images: int, wait: float, elapsed: float) -> dict:
    """An epoch's training numbers over every rank: images/s of all members, the share of time spent waiting for
    the loader, the erased fraction's mean and spread over samples, and the learning rate at the end."""
    stats = [m.loader.stats for m in members]
    images_all, wait_all, erased_sum, erased_sq, erased_n = runtime.all_sum(
        [
            images,
            wait,
            sum(s.mean * s.samples for s in stats),
            sum((s.std**2 + s.mean**2) * s.samples for s in stats),
            sum(s.samples for s in stats),
        ],
        device,
    )
    erased_mean = erased_sum / max(erased_n, 1)
    return {
        "throughput/train_img_per_s": images_all / elapsed,  # every member on every rank
        "throughput/loader_wait_frac": wait_all / runtime.world / elapsed,
        "time/train_s": elapsed,
        "gutout/erased_frac": erased_mean,
        "gutout/erased_frac_std": max(erased_sq / max(erased_n, 1) - erased_mean**2, 0.0) ** 0.5,
        "lr": members[0].scheduler.get_last_lr()[0],
    }
