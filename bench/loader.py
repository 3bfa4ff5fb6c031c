"""Loader throughput, side by side: DALI alone, DALI + Gutout, torchvision ImageFolder + DataLoader.

Real-photo JPEGs (bench/make_corpus.py builds them from Debian's wallpaper packages), batch 64, 224 px,
2 DALI threads / 2 DataLoader workers. Each round runs `--epochs` full epochs of every candidate, in a
rotated order, so machine noise and thermal drift hit them alike; epochs are timed from `iter()` to their
last batch, pipeline start-up included. Candidates: the DALI train view as the loader builds it (on a CPU:
DALI decodes the crop, the host resizes and normalises), a GutoutLoader over it (the cut fused into that
normalising pass) with the loader's defaults (policy threshold 0.5, every sample cut) on synthetic maps that
erase more than real Grad-CAM maps do (about 59% of each crop; the trainer's demo erased 27% of a cut
sample), torchvision with the same augmentation + RandomErasing, and for reference the all-DALI graph
(`cpu_resize="dali"`: DALI's own CPU resize and normalisation).
Reports the median images/s over the rounds, and the goal ratios
(issue 3: DALI + Gutout >= 1.8x torchvision and >= 0.97x DALI alone) as medians of per-round ratios.
Each round also says how many cores other processes used meanwhile: on 2 cores, any of it spoils the run.

    python bench/loader.py                       # builds .bench-data/corpus on first use
    python bench/loader.py --rounds 15 --profile  # plus where the stage's time goes
    python bench/loader.py --breakdown            # where DALI's own time goes, operator by operator
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_corpus beside this file

import make_corpus  # noqa: E402

import gutout  # noqa: E402
from gutout.pipelines import GutoutLoader  # noqa: E402
from gutout.pipelines.batch import LoaderConfig  # noqa: E402
from gutout.pipelines.dali import dali_folder_source  # noqa: E402
from gutout.pipelines.datasets import STATS, scan_folder  # noqa: E402
from gutout.pipelines.host_finish import host_thread_limit  # noqa: E402

MEAN, STD = STATS["imagenet"]


TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (idle and iowait left out)."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def own_busy_s() -> float:
    """CPU seconds of this process (DALI's threads included) and its live children (DataLoader workers)."""
    me, total = os.getpid(), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the fields after "(command name)"
        except OSError:
            continue  # the process ended meanwhile
        if int(stat.parent.name) == me or int(fields[1]) == me:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


class OtherLoad:
    """Cores used by other processes over a stretch of time: on 2 cores any of it skews the candidates
    (and the stage's torch threads most: an OpenMP barrier waits on a descheduled thread)."""

    def __init__(self):
        self.start = (time.perf_counter(), machine_busy_s(), own_busy_s())

    def cores(self) -> float:
        wall, machine, own = (
            now - then
            for now, then in zip((time.perf_counter(), machine_busy_s(), own_busy_s()), self.start, strict=True)
        )
        return max(machine - own, 0.0) / max(wall, 1e-9)


def check_idle(when: str, seconds: float = 1.0) -> bool:
    load = OtherLoad()
    time.sleep(seconds)
    other = load.cores()
    state = "idle" if other < 0.1 else f"BUSY: {other:.2f} cores used by other processes"
    print(f"machine {when}: {state}", flush=True)
    return other < 0.1


def smooth_cache(samples: int, map_size=(7, 7), seed: int = 0) -> gutout.SaliencyCache:
    """One member's maps for every sample: random 3 x 3 fields upsampled to 7 x 7, max-normalised."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(samples, 1, 3, 3, generator=generator)  # (N, 1, 3, 3)
    maps = F.interpolate(coarse, size=map_size, mode="bilinear", align_corners=False)[:, 0]  # (N, 7, 7)
    maps = maps / maps.flatten(1).amax(1).view(-1, 1, 1)
    cache = gutout.SaliencyCache(1, samples, map_size)
    cache.update(0, torch.arange(samples), maps)
    cache.publish()
    return cache


def make_stage(samples: int, cut: gutout.CutConfig) -> gutout.GutoutStage:
    return gutout.GutoutStage(gutout.StageConfig(cut, peers="self"), smooth_cache(samples), member=0)


def dali_epochs(dataset, config: LoaderConfig, cut: gutout.CutConfig | None = None, stats: list | None = None):
    """One epoch of the DALI train view, or of a GutoutLoader over it cutting with `cut` (the product's path:
    on the CPU the cut rides the host's normalising pass); returns the images it yielded."""
    if cut is None:
        source = dali_folder_source(dataset, "train", config)
    else:
        stage = gutout.StageConfig(cut, peers="self")
        loader = GutoutLoader(dataset, config, stage, cache=smooth_cache(len(dataset)))
        if stats is not None:
            stats.append(loader.stats)

    def epoch(e: int) -> int:
        if cut is None:
            source.set_epoch(e)
            return sum(batch.images.shape[0] for batch in source)
        loader.set_epoch(e)
        return sum(batch.images.shape[0] for batch in loader.batches())

    return epoch


def torchvision_epochs(root: Path, config: LoaderConfig) -> Callable[[int], int]:
    """ImageFolder + PIL transforms with the same augmentation, plus RandomErasing, in a DataLoader."""
    import torchvision
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomResizedCrop(config.image_size, scale=config.crop_area, ratio=config.crop_ratio),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
            T.RandomErasing(),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_threads,
        persistent_workers=True,  # workers start once, as in a training run; they idle between epochs
    )

    def epoch(e: int) -> int:
        return sum(images.shape[0] for images, _ in loader)

    return epoch


def side_by_side(candidates: dict[str, Callable[[int], int]], rounds: int, epochs: int) -> dict[str, list[float]]:
    """images/s per round for each candidate: `epochs` epochs each per round, the order rotated every round."""
    names = list(candidates)
    for name in names * 2:  # warm-up: worker start, first pipeline build, page cache, allocator pools
        candidates[name](0)
    rates: dict[str, list[float]] = {name: [] for name in names}
    worst = 0.0
    for r in range(rounds):
        load = OtherLoad()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            images = sum(candidates[name](r * epochs + e + 1) for e in range(epochs))
            rates[name].append(images / (time.perf_counter() - start))
        other = load.cores()
        worst = max(worst, other)
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names)
            + f" (other processes: {other:.2f} cores)",
            flush=True,
        )
    if worst >= 0.1:
        print(f"WARNING: other processes used up to {worst:.2f} cores in a round; these timings are not valid")
    return rates


def paired_ratio(values: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range of per-round ratios: round-to-round drift of the machine cancels."""
    ratios = [v / b for v, b in zip(values, base, strict=True)]
    if len(ratios) < 4:
        return statistics.median(ratios), min(ratios), max(ratios)
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high


def profile_stage(dataset, config: LoaderConfig, stage: gutout.GutoutStage, repeats: int) -> None:
    """The stage alone on real DALI batches (no loader running): median ms per batch and the top ops."""
    batches = [b for _, b in zip(range(4), dali_folder_source(dataset, "train", config), strict=False)]
    generator = torch.Generator().manual_seed(0)
    clones = [b.images.clone() for b in batches]
    run = lambda i: stage(
        clones[i % 4].copy_(batches[i % 4].images),
        batches[i % 4].indices,
        batches[i % 4].windows,
        batches[i % 4].flips,
        generator,
    )
    copy = lambda i: clones[i % 4].copy_(batches[i % 4].images)
    for fn in (run, copy):
        fn(0)
    times = {"stage + restore copy": [], "restore copy alone": []}
    for i in range(repeats):
        for name, fn in (("stage + restore copy", run), ("restore copy alone", copy)):
            start = time.perf_counter()
            fn(i)
            times[name].append((time.perf_counter() - start) * 1e3)
    for name, values in times.items():
        print(f"  {name}: {statistics.median(values):.2f} ms per batch of {config.batch_size}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(repeats):
            run(i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def dali_breakdown(dataset, config: LoaderConfig, rounds: int) -> None:
    """DALI's train graph cut short after each operator, side by side: what each step costs per image-core.

    The same operators and arguments as `gutout.pipelines.dali` (ROI decode of a random-resized crop, resize,
    crop_mirror_normalize); each prefix runs whole epochs of the corpus with the same threads.
    """
    from nvidia.dali import fn, pipeline_def, types

    files = [str(p) for p in dataset.paths]
    B = config.batch_size
    steps = ("read", "decode crop", "+ resize", "+ normalise")

    def build(step: str):
        @pipeline_def(
            batch_size=B,
            num_threads=config.num_threads,
            device_id=None,
            seed=0,
            prefetch_queue_depth=2,
            exec_dynamic=True,
        )
        def graph():
            jpegs, _ = fn.readers.file(files=files, labels=list(range(len(files))), pad_last_batch=True)
            if step == "read":
                return jpegs
            shape = fn.peek_image_shape(jpegs)
            anchor, size = fn.random_crop_generator(
                shape, random_area=list(config.crop_area), random_aspect_ratio=list(config.crop_ratio)
            )
            images = fn.decoders.image_slice(jpegs, anchor, size, axis_names="HW", output_type=types.RGB)
            if step == "decode crop":
                return images
            images = fn.resize(images, size=[config.image_size] * 2)
            if step == "+ resize":
                return images
            return fn.crop_mirror_normalize(
                images,
                mirror=fn.random.coin_flip(),
                mean=[m * 255 for m in MEAN],
                std=[s * 255 for s in STD],
                output_layout="CHW",
                dtype=types.FLOAT,
            )

        return graph()

    def epoch(step: str) -> float:
        pipe = build(step)
        pipe.build()
        batches = -(-len(files) // B)
        start = time.perf_counter()
        for k in range(batches):
            if k == 0:
                pipe.schedule_run()
            pipe.outputs()
            if k + 2 < batches:
                pipe.schedule_run()
        return len(files) / (time.perf_counter() - start)

    for step in steps:
        epoch(step)
    rates = {step: [] for step in steps}
    for _ in range(rounds):
        for step in steps:
            rates[step].append(epoch(step))
    print(f"\nDALI's train graph, cut short after each operator ({config.num_threads} threads, median of {rounds}):")
    print("| graph | images/s | ms per image per core | this step |\n|---|---|---|---|")
    before = 0.0
    for step in steps:
        cost = config.num_threads * 1e3 / statistics.median(rates[step])
        print(f"| {step} | {statistics.median(rates[step]):.0f} | {cost:.3f} | {cost - before:+.3f} |")
        before = cost


def array_backends(rounds: int, batch: int, cut: gutout.CutConfig) -> None:
    """Fashion-MNIST (60000 x 28 x 28, in memory) through GutoutLoader: the tensor backend (the dataset as one
    tensor, pad-and-crop + flip as batched ops) and DALI's array pipeline, each without and with the stage."""
    from gutout.pipelines import GutoutLoader
    from gutout.pipelines.datasets import load_fashion_mnist

    data = load_fashion_mnist("train")
    cache = smooth_cache(len(data))
    loaders = {}
    for backend in ("tensor", "dali"):
        for policy in ("none", cut.policy):
            options = dict(
                batch_size=batch,
                backend=backend,
                policy=policy,
                threshold=cut.threshold,
                p=cut.p,
                kernel=cut.kernel,
                peers="self",
            )
            name = f"{backend}{'+gutout' if policy != 'none' else ''}"
            loaders[name] = GutoutLoader.from_arrays(
                data.images, data.labels, classes=data.classes, cache=cache, **options
            )

    def epochs(loader):
        def run(e: int) -> int:
            loader.set_epoch(e)
            return sum(images.shape[0] for images, _ in loader)

        return run

    rates = side_by_side({name: epochs(loader) for name, loader in loaders.items()}, rounds, epochs=1)
    print(f"\n| Fashion-MNIST, batch {batch}, CPU | images/s (median of {rounds}) |\n|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.0f} |")
    for backend in ("tensor", "dali"):
        ratio, low, high = paired_ratio(rates[f"{backend}+gutout"], rates[backend])
        print(f"  {backend}+gutout / {backend}: {ratio:.3f}x [{low:.3f}, {high:.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(".bench-data/corpus"))
    parser.add_argument("--images", type=int, default=1000, help="corpus size, if it has to be built")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads and DataLoader workers")
    # torch's own thread count by default, as a user has it: the loader bounds its host pass itself
    # (LoaderConfig.host_threads), and "dali+gutout, unbounded" shows the same loader without that bound.
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per candidate per round (longer: less noise)")
    parser.add_argument("--policy", default="threshold", help="the stage's policy (CutConfig)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--p", type=float, default=1.0, help="probability that a sample is cut (loader default 1)")
    parser.add_argument("--kernel", default="auto", help="auto (the fused kernel where it runs) or torch")
    parser.add_argument("--only", nargs="*", default=None, help="run only these candidates")
    parser.add_argument("--profile", action="store_true", help="also time and profile the stage alone")
    parser.add_argument("--breakdown", action="store_true", help="only time DALI's graph operator by operator")
    parser.add_argument("--arrays", action="store_true", help="only time the array backends on Fashion-MNIST")
    args = parser.parse_args()

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    check_idle("before the run")
    if not args.data.exists():
        make_corpus.build(args.data, args.images, classes=10, seed=0)
    dataset = scan_folder(args.data)
    config = LoaderConfig(batch_size=args.batch, image_size=args.size, num_threads=args.threads)
    cut = gutout.CutConfig(policy=args.policy, threshold=args.threshold, p=args.p, kernel=args.kernel)
    if args.breakdown:
        dali_breakdown(dataset, config, args.rounds)
        return
    if args.arrays:
        array_backends(args.rounds, batch=256, cut=cut)
        return
    stats = []
    candidates = {
        "dali": dali_epochs(dataset, config),
        "dali+gutout": dali_epochs(dataset, config, cut, stats),
        # The host pass at torch's own thread count, beside DALI's threads (LoaderConfig.host_threads=0).
        "dali+gutout, unbounded": dali_epochs(dataset, dataclasses.replace(config, host_threads=0), cut),
        "torchvision": torchvision_epochs(args.data, config),
        # The whole graph in DALI (its CPU resize and normalisation), for reference.
        "dali, DALI resize": dali_epochs(dataset, dataclasses.replace(config, cpu_resize="dali")),
    }
    if args.only:
        candidates = {name: fn for name, fn in candidates.items() if name in args.only}
    print(
        f"{len(dataset)} JPEGs from {args.data}, batch {args.batch}, {args.size} px, {args.threads} DALI threads"
        f" / DataLoader workers, torch {torch.get_num_threads()} threads (the host pass: at most"
        f" {host_thread_limit(None, args.threads)}), {args.rounds} rounds of {args.epochs} epochs;"
        f" stage: {args.policy} {args.threshold}, p {args.p}, kernel {args.kernel}"
    )
    rates = side_by_side(candidates, args.rounds, args.epochs)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n| loader | images/s (median of {args.rounds}) | min | max |\n|---|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {median[name]:.0f} | {min(values):.0f} | {max(values):.0f} |")
    if "dali+gutout" in median:
        print(f"\nerased fraction per sample: mean {stats[0].mean:.3f}, std {stats[0].std:.3f}")
    print("\nratios: the median over rounds of each round's ratio (both candidates ran in the same round), [IQR]")
    for name, base, goal in (
        ("dali+gutout", "dali", 0.97),
        ("dali+gutout, unbounded", "dali", None),
        ("dali+gutout", "torchvision", 1.8),
        ("dali", "torchvision", None),
    ):
        if name in rates and base in rates:
            ratio, low, high = paired_ratio(rates[name], rates[base])
            verdict = "" if goal is None else f" ({'meets' if ratio >= goal else 'misses'} the goal of {goal}x)"
            print(f"  {name} / {base}: {ratio:.3f}x [{low:.3f}, {high:.3f}]{verdict}")
    check_idle("after the run")
    if args.profile:
        print("\nthe stage alone, on stored DALI batches:")
        profile_stage(dataset, config, make_stage(len(dataset), cut), repeats=20)


if __name__ == "__main__":
    main()
