"""Gutout's run-time tax: whole `gutout train` runs, Gutout against Cutout, side by side in one invocation.

For each ensemble size K, the arms (Cutout; Gutout refreshed by a pass; Gutout harvested from the training
forward) train the same data, seed and schedule, interleaved round by round with the order rotated, each into
a fresh run directory. Printed per arm: the median run's wall time (the whole `Trainer.run`, start-up to the
last checkpoint), its ratio to Cutout's at the same K, and the mean per-epoch breakdown the trainer logs
(`time/train_s` + `refresh_s` + `eval_s` + `checkpoint_s` + `other_s` = `time/epoch_s`); "outside" is the run's
wall time that no epoch's window holds (the refresh before the first epoch, the last checkpoint, the figures).

    python bench/tax.py                                   # K = 1 and 2, 10,000 samples, 2 epochs, 1 round
    python bench/tax.py --ensembles 2 --rounds 3 --eval-batch-size 128
    python bench/tax.py --samples 512 --epochs 1 --ensembles 1    # a dry run
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

PARTS = ("train_s", "refresh_s", "eval_s", "checkpoint_s", "other_s")
# The arms: TrainConfig overrides on top of the trainer's defaults (Gutout is the trainer's default policy).
ARMS = {
    "cutout": run_overrides("cutout", "fashion-mnist"),
    "gutout-pass": dict(refresh="pass"),
    "gutout-harvest": dict(refresh="harvest"),
}


def one_run(base: TrainConfig, arm: str, ensemble: int, out: str) -> dict:
    """Train one arm; returns its wall time and its per-epoch records."""
    cfg = TrainConfig(**(base.to_dict() | ARMS[arm] | dict(ensemble=ensemble, out=out, name=f"{arm}-k{ensemble}")))
    trainer = Trainer(cfg, log=lambda *a: None)
    started = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - started
    return {"wall": wall, "records": trainer.history}


def summarise(runs: list[dict]) -> dict:
    """The median-wall run of an arm, with its mean per-epoch parts and the time outside every epoch's window."""
    run = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]
    records = run["records"]
    parts = {part: statistics.mean(r[f"time/{part}"] for r in records) for part in (*PARTS, "epoch_s")}
    parts["outside"] = run["wall"] - records[-1]["time/run_s"]
    return {"wall": run["wall"], **parts}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000, help="Fashion-MNIST training subset")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ensembles", default="1,2", help="K values, comma-separated")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--rounds", type=int, default=1, help="runs per arm, interleaved; the median is reported")
    parser.add_argument("--eval-batch-size", type=int, help="default: the trainer's for the device")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the trainer's search)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(ARMS)}")
    base = bench_config(
        data=args.data,
        subset=args.samples,
        epochs=args.epochs,
        eval_batch_size=args.eval_batch_size,
        device=args.device,
    )
    eval_batch = base.eval_batch_for(torch.device(args.device).type)
    print(
        f"# gutout train, fashion-mnist, {args.samples} samples, {args.epochs} epochs, eval/refresh batch "
        f"{eval_batch}, {args.device} ({torch.get_num_threads()} threads), {args.rounds} round(s)"
    )
    print("| K | arm | run (s) | ratio to cutout | epoch (s) | train | refresh | eval | checkpoint | other | outside |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for ensemble in (int(k) for k in args.ensembles.split(",")):
            runs: dict[str, list[dict]] = {arm: [] for arm in arms}
            for round_ in range(args.rounds):
                for arm in arms[round_ % len(arms) :] + arms[: round_ % len(arms)]:
                    runs[arm].append(one_run(base, arm, ensemble, f"{out}/r{round_}"))
            rows = {arm: summarise(arm_runs) for arm, arm_runs in runs.items()}
            reference = rows["cutout"]["wall"] if "cutout" in rows else None
            for arm, row in rows.items():
                ratio = f"{row['wall'] / reference:.2f}x" if reference else "-"
                parts = " | ".join(f"{row[part]:.1f}" for part in (*PARTS, "outside"))
                print(f"| {ensemble} | {arm} | {row['wall']:.1f} | {ratio} | {row['epoch_s']:.1f} | {parts} |")


if __name__ == "__main__":
    main()
