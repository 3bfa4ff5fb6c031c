"""What step records cost: training epochs with a record every step, at the default rate, and once per epoch.

Each setting trains the same data, seed and schedule (K members, Cutout, no refresh to muddy the timing), the
settings interleaved round by round with the order rotated, each into a fresh run directory, after one unmeasured
warm-up run. Printed: the median
over rounds of the training part of each epoch (`time/train_s`, the steps alone), and its ratio to one record per
epoch. Every setting accumulates each step's loss on the device the same way; what differs is how often the sums
are read (one synchronisation and, with several ranks, one all-reduce per record) and a record is written.
Whole runs are noisy on a busy machine, so the bookkeeping itself (`StepWindow.add` per member step, `close` per
record) is also timed apart and expressed as a share of the measured step time.

    python bench/step_logging.py                          # 5,000 samples, K = 2, 2 epochs, 3 rounds
    python bench/step_logging.py --samples 512 --rounds 1 --epochs 1    # a dry run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _runs import bench_config

from gutout.train.compare import run_overrides
from gutout.train.config import TrainConfig
from gutout.train.trainer import Trainer


def train_seconds(base: TrainConfig, log_every: int, out: str, name: str) -> float:
    """Mean `time/train_s` over the epochs of one run with a step record every `log_every` steps."""
    cfg = TrainConfig(**(base.to_dict() | dict(log_every=log_every, out=out, name=name)))
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.run()
    return statistics.mean(r["time/train_s"] for r in trainer.history)


def bookkeeping_us(members: int, out: str, repeats: int = 20_000) -> tuple[float, float]:
    """Microseconds per `StepWindow.add` (every member's step) and per `close` (a record, appended to a real
    metrics.jsonl without W&B), on the CPU, single process: the whole cost step records add to training, measured
    apart from the noise of whole runs."""
    from pathlib import Path
    from types import SimpleNamespace

    from gutout.train.distributed import Runtime
    from gutout.train.steplog import StepWindow
    from gutout.train.tracking import Tracker

    tracker = Tracker(Path(out), {}, "disabled", "bench", "bench")

    scheduler = SimpleNamespace(get_last_lr=lambda: [0.1])
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(steps_per_record=lambda steps: 1, ensemble=members),
        device=torch.device("cpu"),
        runtime=Runtime(),
        members=[SimpleNamespace(scheduler=scheduler)],
        _log_step=tracker.log_step,
    )
    window = StepWindow(trainer, epoch=0, steps=repeats, start=time.perf_counter())
    loss = torch.tensor(0.5)
    start = time.perf_counter()
    for i in range(repeats):
        window.add(i % members, loss, 128, 0.0)
    add = (time.perf_counter() - start) / repeats * 1e6
    start = time.perf_counter()
    for i in range(repeats // 10):
        window.add(0, loss, 128, 0.0)
        window.close(i)
    close = (time.perf_counter() - start) / (repeats // 10) * 1e6 - add
    return add, close


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5_000, help="Fashion-MNIST training subset")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ensemble", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--rounds", type=int, default=3, help="whole-run rounds; 0: the bookkeeping alone")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the trainer's search)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        add_us, close_us = bookkeeping_us(args.ensemble, out)
    print(f"bookkeeping (CPU): {add_us:.1f} us per member step, {close_us:.1f} us per record (metrics.jsonl, no W&B)")
    if args.rounds == 0:
        return
    base = bench_config(
        **run_overrides("cutout", "fashion-mnist"),
        data=args.data,
        subset=args.samples,
        epochs=args.epochs,
        ensemble=args.ensemble,
        batch_size=args.batch_size,
        device=args.device,
    )
    steps = args.samples // args.batch_size  # the loader drops the last partial batch
    settings = {
        "every step": 1,
        f"default (every {base.steps_per_record(steps)})": base.steps_per_record(steps),
        f"once per epoch (every {steps})": steps,
    }
    print(
        f"# K = {args.ensemble}, {args.samples} samples, batch {args.batch_size} ({steps} steps per epoch), "
        f"{args.epochs} epochs, {args.device} ({torch.get_num_threads()} threads), {args.rounds} round(s)"
    )
    times: dict[str, list[float]] = {name: [] for name in settings}
    names = list(settings)
    with tempfile.TemporaryDirectory() as out:
        train_seconds(base, 1, f"{out}/warm-up", "warm-up")  # the first run in a process pays one-off start-up costs
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                run_name = f"setting-{names.index(name)}"
                times[name].append(train_seconds(base, settings[name], f"{out}/r{round_}", run_name))
    reference = statistics.median(times[names[-1]])
    step_ms = 1e3 * reference / steps
    share = (args.ensemble * add_us + close_us) / (10 * step_ms)  # us / (ms * 1000) * 100 %
    print(f"a step of all {args.ensemble} members: {step_ms:.0f} ms; a record every step costs {share:.3f} % of it")
    print("| step records | train s per epoch (median) | each round | ratio to once per epoch |")
    print("|---|---|---|---|")
    for name in names:
        median = statistics.median(times[name])
        each = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {median:.2f} | {each} | {median / reference:.3f}x |")


if __name__ == "__main__":
    main()
