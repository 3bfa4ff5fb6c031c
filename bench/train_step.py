"""Training-step throughput with the cut stage in the loop: no stage, Cutout, Gutout (images/s, side by side).

A ResNet-50 AMP step (channels-last, SGD) at batch 256 on synthetic data. Each step copies a fresh batch out
of a small pool (as a loader's output would arrive), runs the stage in place, then forward/backward/step.
Blocks of steps alternate between the three variants, so drift hits them alike. Goal: Gutout >= 0.97x Cutout.

    python bench/train_step.py --device cuda
    python bench/train_step.py --device cpu --model resnet18 --batch 8 --size 64 --steps 2   # a dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import describe_device, sync  # noqa: E402
from stage import realistic_batch  # noqa: E402

from gutout import CutConfig, GutoutStage, SaliencyCache, StageConfig  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per variant, interleaved")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    model = getattr(torchvision.models, args.model)().to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    dtype = torch.float16 if amp else torch.float32
    pool_size, samples = 3, 10_000
    pool = [realistic_batch(args.batch, args.size, device, dtype) for _ in range(pool_size)]
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    indices = [torch.randint(0, samples, (args.batch,), device=device) for _ in range(pool_size)]
    cache = SaliencyCache(1, samples, (7, 7), device=device)
    cache.update(0, torch.arange(samples), realistic_batch(samples, 8, torch.device("cpu"), torch.float32)[1])
    cache.publish()
    stages = {
        "no stage": None,
        "cutout": GutoutStage(StageConfig(CutConfig(policy="cutout", size=0.5)), cache),
        "gutout": GutoutStage(StageConfig(CutConfig(policy="threshold", threshold=0.5), peers="self"), cache),
    }
    work = torch.empty_like(pool[0][0])
    generator = torch.Generator().manual_seed(0)

    def step(i: int, stage) -> None:
        images, _, windows, flips = pool[i % pool_size]
        work.copy_(images)  # a fresh batch, as the loader would hand it over
        batch = work if stage is None else stage(work, indices[i % pool_size], windows, flips, generator)
        batch = batch.contiguous(memory_format=torch.channels_last) if amp else batch
        with torch.autocast(device.type, dtype=torch.float16) if amp else nullcontext():
            loss = F.cross_entropy(model(batch), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for stage in stages.values():  # warm-up: cudnn autotuning, kernel compilation
        for i in range(3):
            step(i, stage)
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(args.blocks):
        for name, stage in stages.items():
            sync(device)
            start = time.perf_counter()
            for i in range(args.steps):
                step(i, stage)
            sync(device)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"# {args.model} training step, batch {args.batch}, {args.size} px, {'AMP fp16, ' if amp else ''}"
        f"{describe_device(device)}; median of {args.blocks} blocks of {args.steps} steps"
    )
    print("| variant | images/s | vs no stage | vs cutout |")
    print("|---|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} | {value / median['no stage']:.3f} | {value / median['cutout']:.3f} |")


if __name__ == "__main__":
    main()
