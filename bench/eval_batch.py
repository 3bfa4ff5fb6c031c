"""The batch size of the passes that need no gradient step: evaluation (a `no_grad` forward) and the saliency
refresh (`GutoutLoader.refresh`), over the same samples at several batch sizes, side by side.

The trainer's default `eval_batch_size` per device type (train/config.py) comes from this bench: the fastest
batch size here, or the smallest within a few percent of it.

    python bench/eval_batch.py                          # the small ResNet, 10,000 Fashion-MNIST images, CPU
    python bench/eval_batch.py --device cuda --samples 60000 --sizes 256,512,1024,2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import describe_device, time_side_by_side  # noqa: E402

from gutout import SaliencyCache  # noqa: E402
from gutout.pipelines import GutoutLoader, LoaderConfig  # noqa: E402
from gutout.train.config import TrainConfig  # noqa: E402
from gutout.train.data import load_splits  # noqa: E402
from gutout.train.models import build_model  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--sizes", default="64,128,256,512,1024")
    parser.add_argument("--model", default="small-resnet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the trainer's search)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    train = load_splits(TrainConfig(data=args.data, subset=args.samples)).train
    net = build_model(args.model, len(train.classes), train.channels).to(device).eval()
    cache = SaliencyCache(1, len(train), (7, 7), device=device)
    loader = GutoutLoader(train, LoaderConfig(backend="tensor", device=args.device, num_threads=0), cache=cache)

    def forward(size: int):
        def run():
            with torch.no_grad():
                for batch in loader.view("val", size):
                    net(batch.images)

        return run

    def refresh(size: int):
        return lambda: loader.refresh(net, batch_size=size)

    sizes = [int(s) for s in args.sizes.split(",")]
    candidates = {f"forward {s}": forward(s) for s in sizes} | {f"refresh {s}": refresh(s) for s in sizes}
    times = time_side_by_side(candidates, device, repeats=args.rounds)
    print(f"# {args.model}, {len(train)} samples, {describe_device(device)}, median of {args.rounds} rounds")
    print("| pass over the samples (s) | " + " | ".join(f"batch {s}" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for kind in ("forward", "refresh"):
        best = min(times[f"{kind} {s}"] for s in sizes)
        cells = " | ".join(f"{times[f'{kind} {s}'] / 1e3:.2f} ({times[f'{kind} {s}'] / best:.2f}x)" for s in sizes)
        print(f"| {kind} | {cells} |")


if __name__ == "__main__":
    main()
