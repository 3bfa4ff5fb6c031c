"""Cut-stage speed: ms per batch for each policy, beside a plain normalise pass (one read and one write of the
batch: the memory-bound floor); the torch reference beside the device's fused kernel (CuPy on CUDA, Numba on
the CPU) where it runs. Side by side.

    python bench/stage.py                          # CPU, B = 64 and 256, 3 x 224 x 224
    python bench/stage.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import describe_device, time_side_by_side  # noqa: E402

from gutout import CutConfig, cpu_kernel, cut, kernels  # noqa: E402

POLICIES = {
    "threshold": dict(policy="threshold", threshold=0.5),
    "area": dict(policy="area", area=0.25),
    "box": dict(policy="box", size=0.5),
    "cutout": dict(policy="cutout", size=0.5),
}


def realistic_batch(B: int, hw: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, hw, hw, generator=g).to(device, dtype)
    # Smooth 7 x 7 maps with one blob each, like Grad-CAM's, max-normalised.
    blobs = F.avg_pool2d(torch.rand(B, 1, 11, 11, generator=g) ** 4, 5, stride=1)[:, 0]
    maps = (blobs / blobs.amax((1, 2), keepdim=True)).to(device)
    scale = torch.rand(B, generator=g) * 0.9 + 0.1  # RandomResizedCrop-like windows
    side = scale.sqrt()
    y0 = torch.rand(B, generator=g) * (1 - side)
    x0 = torch.rand(B, generator=g) * (1 - side)
    windows = torch.stack([y0, x0, y0 + side, x0 + side], 1).to(device)
    flips = (torch.rand(B, generator=g) < 0.5).to(device)
    return images, maps, windows, flips


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(
        f"# Cut stage, 3 x {args.size} x {args.size} {args.dtype}, {describe_device(device)}, "
        f"median of {args.repeats} (ms per batch)"
    )
    for B in map(int, args.batches.split(",")):
        images, maps, windows, flips = realistic_batch(B, args.size, device, dtype)
        work = images.clone()
        candidates = {}
        normalised = torch.empty_like(images)
        candidates["normalise pass"] = lambda: torch.sub(images, 0.5, out=normalised).div_(0.25)
        for name, options in POLICIES.items():
            fused = "cupy" if images.is_cuda else "numba"
            backends = ["torch"] + ([fused] if {"cupy": kernels, "numba": cpu_kernel}[fused].supports(images) else [])
            for backend in backends:
                cfg = CutConfig(**options, kernel=backend)
                gen = torch.Generator().manual_seed(1)
                candidates[f"{name} / {backend}"] = lambda cfg=cfg, gen=gen: cut(
                    work, maps, windows, flips, cfg, generator=gen, inplace=True
                )
        ms = time_side_by_side(candidates, device, args.repeats)
        floor = ms.get("normalise pass")
        print(f"\nB = {B}")
        print("| stage | ms | x normalise pass | torch / fused |")
        print("|---|---|---|---|")
        for name, value in ms.items():
            vs_floor = f"{value / floor:.2f}" if floor else "-"
            speedup = "-"
            backend = name.rsplit("/ ", 1)[-1]
            if backend in ("cupy", "numba"):
                speedup = f"{ms[name.replace(backend, 'torch')] / value:.1f}"
            print(f"| {name} | {value:.3f} | {vs_floor} | {speedup} |")


if __name__ == "__main__":
    main()
