"""How far cheaper maps are from the refresh pass's, on a trained model: harvested ones, and a pass at a smaller
input size (--refresh-size).

The pass computes each sample's Grad-CAM on the whole image in eval mode. Harvest takes the CAM of the training
forward instead (train mode, a random crop and flip, and — with Gutout on — a cut image), warped back to the
canonical frame where the crop saw the image. This bench loads a trained run's member 0 (`--run`), computes both
for the same samples over one epoch of training views, and reports per sample, over the cells the views covered:
the Pearson correlation with the pass's map, the IoU of the two maps' top-20 % cells, and the covered fraction.
Views are taken uncut and cut (the trainer's Gutout stage at its default p, reading the pass's maps), without any
optimiser step (the model is a copy; its BatchNorm statistics are restored). With `--refresh-sizes`, the pass is
also run at each of those input sides (coarser maps, resampled to the cache's grid) and compared over every cell,
with the time of each pass against the full-size one's.

    python bench/harvest_agreement.py --run runs/screen/small-5k-30/fashion-mnist-none-k1-s0 --samples 4000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time

import torch
from _runs import rebuilt

from gutout import ActivationCapture, CutConfig, cam_from_activations, warp_to_canonical
from gutout.train.config import TrainConfig
from gutout.train.trainer import Trainer


def pearson(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row correlation of (N, n) maps over the cells `mask` (N, n) holds (NaN where a side is constant)."""
    count = mask.sum(1).clamp_min(1)
    centred = [torch.where(mask, x - (x * mask).sum(1, keepdim=True) / count[:, None], 0) for x in (a, b)]
    covariance = (centred[0] * centred[1]).sum(1)
    return covariance / (centred[0].square().sum(1).sqrt() * centred[1].square().sum(1).sqrt())


def top_iou(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, share: float = 0.2) -> torch.Tensor:
    """IoU of the top `share` of covered cells by value in `a` and in `b`, per row."""
    ious = []
    for row_a, row_b, row_mask in zip(a, b, mask, strict=True):
        cells = row_mask.nonzero().view(-1)
        k = max(1, round(share * len(cells)))
        top_a = set(cells[row_a[cells].topk(k).indices].tolist())
        top_b = set(cells[row_b[cells].topk(k).indices].tolist())
        ious.append(len(top_a & top_b) / len(top_a | top_b))
    return torch.tensor(ious)


def agreement_cells(maps: torch.Tensor, passed: torch.Tensor, mask: torch.Tensor) -> str:
    """Median and lower-quartile r, and median top-20 % IoU, of (N, n) maps against the pass's, as table cells."""
    r = pearson(maps, passed, mask)
    quartiles = statistics.quantiles(r[~r.isnan()].tolist(), n=4)
    return f"{quartiles[1]:.3f} | {quartiles[0]:.3f} | {float(top_iou(maps, passed, mask).median()):.3f}"


def harvest_epoch(trainer: Trainer, cut: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of member 0's training views (cut or not), the CAM of each forward warped to the canonical
    frame: (maps (N, h, w), covered (N, h, w)), the last view of each sample winning as in the trainer."""
    member = trainer.members[0]
    net = copy.deepcopy(member.net).train()  # train-mode forwards, as harvest sees them; the original untouched
    n, (h, w) = len(trainer.train_set), trainer.map_size
    maps, covered = torch.zeros(n, h, w), torch.zeros(n, h, w, dtype=torch.bool)
    stage = member.loader.stage.config
    member.loader.stage.config = stage if cut else dataclasses.replace(stage, cut=dataclasses.replace(stage.cut, p=0.0))
    member.loader.set_epoch(1)
    with torch.no_grad():
        for batch in member.loader.batches():
            with ActivationCapture(net, trainer.layer) as capture:
                net(batch.images)
            cams = cam_from_activations(capture.activations, net.fc.weight, batch.labels)
            warped, seen = warp_to_canonical(cams, batch.windows, batch.flips, trainer.map_size)
            maps[batch.indices] = torch.where(seen, warped.float(), maps[batch.indices])
            covered[batch.indices] |= seen
    member.loader.stage.config = stage
    return maps, covered


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished gutout train run directory (member 0 is used)")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--refresh-sizes", default="", help="comma-separated input sides of reduced-size passes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        report(args, out)


def report(args, out: str) -> None:
    # Member 0 alone, on `--samples` of the run's training samples; the cut views take the trainer's default cut,
    # whatever the run itself cut with.
    defaults = TrainConfig()
    default_cut = {field.name: getattr(defaults, field.name) for field in dataclasses.fields(CutConfig)}
    trainer = rebuilt(args.run, out, ensemble=1, subset=args.samples, **default_cut)
    loader, net = trainer.members[0].loader, trainer.members[0].net
    start = time.perf_counter()
    loader.refresh(net, trainer.layer, batch_size=trainer.eval_batch_size)  # the pass's maps, published
    full_s = time.perf_counter() - start
    passed = trainer.cache.maps[0].float().flatten(1).clone()
    print(f"# {args.run}, member 0, {len(trainer.train_set)} training samples, maps {trainer.map_size}")
    print("| views | median r | lower-quartile r | median top-20 % IoU | covered cells |")
    print("|---|---|---|---|---|")
    for cut in (False, True):
        maps, covered = harvest_epoch(trainer, cut)
        maps, covered = maps.flatten(1), covered.flatten(1)
        views = f"cut (Gutout, p = {trainer.cfg.p:.2g})" if cut else "uncut"
        print(f"| {views} | {agreement_cells(maps, passed, covered)} | {float(covered.float().mean()):.1%} |")
    sizes = [int(size) for size in args.refresh_sizes.split(",") if size]
    if sizes:
        print("\n| refresh pass at | median r | lower-quartile r | median top-20 % IoU | pass time vs full size |")
        print("|---|---|---|---|---|")
    for size in sizes:
        start = time.perf_counter()
        loader.refresh(net, trainer.layer, batch_size=trainer.eval_batch_size, image_size=size)
        seconds = time.perf_counter() - start
        maps = trainer.cache.maps[0].float().flatten(1)
        everywhere = torch.ones_like(maps, dtype=torch.bool)
        print(f"| {size} px | {agreement_cells(maps, passed, everywhere)} | {seconds / full_s:.2f}x |")


if __name__ == "__main__":
    main()
