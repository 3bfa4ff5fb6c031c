"""What one mid-epoch checkpoint costs: milliseconds to write and megabytes on disk.

Two cases, each written `--repeats` times through the trainer's own checkpoint code (member files, then the common
file, atomic writes with fsync, the previous checkpoint kept by a hard link), median time printed:

- the demo: `make demo`'s configuration (Fashion-MNIST, 2 small ResNets, 20,000 samples), a Trainer built as
  `gutout train` builds it;
- ImageNet-sized: 4 ResNet-50 members with SGD momentum and a saliency cache of 4 x 1,281,167 7 x 7 maps. No
  ImageNet is read: the members and the cache have the shapes a real run has, which is all the cost depends on.

    python bench/checkpoint_cost.py                    # both
    python bench/checkpoint_cost.py --cases demo --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from gutout import SaliencyCache
from gutout.train import checkpoint
from gutout.train.config import TrainConfig
from gutout.train.distributed import Runtime, plan_layout
from gutout.train.rundir import CHECKPOINT

IMAGENET_SAMPLES = 1_281_167
MB = 1e6


def files_mb(run_dir: Path, epoch: int, step: int, members: int) -> tuple[float, float]:
    """(common file, all member files) of one checkpoint position, in MB."""
    member = sum(checkpoint.member_path(run_dir, m, epoch, step).stat().st_size for m in range(members))
    return (run_dir / CHECKPOINT).stat().st_size / MB, member / MB


def time_saves(save, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` saves (each at a new step, as a run writes them)."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        save(i)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def demo_case(out: str, repeats: int) -> tuple[str, list[float], float, float]:
    from gutout.train.trainer import Trainer

    cfg = TrainConfig(dataset="fashion-mnist", ensemble=2, subset=20000, epochs=5, device="cpu", out=out, name="demo")
    cfg = TrainConfig(**(cfg.to_dict() | dict(wandb="disabled", sample_grid=0)))
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    progress = [dict(images=0, wait=0.0, harvest_s=0.0, elapsed=0.0, window=None)]

    def save(i: int) -> None:
        trainer.save_checkpoint(0, 100 + i, progress)

    times = time_saves(save, repeats)
    common, members = files_mb(trainer.run_dir, 0, 100 + repeats - 1, cfg.ensemble)
    return "demo: 2 x small ResNet, 20,000-sample cache", times, common, members


def imagenet_case(out: str, repeats: int, members: int = 4) -> tuple[str, list[float], float, float]:
    from torchvision.models import resnet50

    runtime, layout = Runtime(), plan_layout(members, 1, 0)
    built = []
    for m in range(members):
        net = resnet50()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for p in net.parameters():  # one step, so the momentum buffers exist as in a running job
            p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        built.append(SimpleNamespace(index=m, net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler))
    cache = SaliencyCache(members, IMAGENET_SAMPLES, (7, 7))
    cfg = TrainConfig(dataset="imagenet", data="/imagenet", ensemble=members, out=out, name="imagenet")  # not read
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = [dict(images=0, wait=0.0, harvest_s=0.0, elapsed=0.0, window=None)]

    def save(i: int) -> None:
        common = checkpoint.common_state(cfg, 0, cache, [], [], 1000 + i, progress)
        checkpoint.save(run_dir, 0, built, common, layout, runtime, 1000 + i)
        keep = [checkpoint.position(0, 1000 + i)] + ([checkpoint.position(0, 999 + i)] if i else [])
        checkpoint.prune(run_dir, keep, runtime)

    times = time_saves(save, repeats)
    common, member_mb = files_mb(run_dir, 0, 1000 + repeats - 1, members)
    label = f"ImageNet-sized: {members} x ResNet-50 + SGD momentum, {IMAGENET_SAMPLES:,}-sample cache"
    return label, times, common, member_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="demo,imagenet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="where the checkpoints are written (default: a temporary folder)")
    args = parser.parse_args()
    cases = {"demo": demo_case, "imagenet": imagenet_case}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} saves\n")
    print("| checkpoint | ms (median) | ms (each) | common file (MB) | member files (MB) | total (MB) | MB/s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory(dir=args.out) as out:
            label, times, common, members = cases[name](out, args.repeats)
        ms = statistics.median(times)
        total = common + members
        each = ", ".join(f"{t:.0f}" for t in times)
        print(f"| {label} | {ms:.0f} | {each} | {common:.1f} | {members:.1f} | {total:.1f} | {total / ms * 1e3:.0f} |")


if __name__ == "__main__":
    main()
