"""The members' map similarity of finished ensemble runs, for runs that predate the metric.

`ensemble/cam_similarity` (train/evaluation.py: the mean cosine similarity of two members' true-class Grad-CAM maps
of the same image) is in every K >= 2 run's final record; this recomputes it from a run directory's last checkpoint
for runs recorded without it. Each run is rebuilt from its `config.yaml` (same data, split and subset), its members
loaded, and their maps made on the split asked for. Printed: one line per run, then per arm (the run name without
its seed) the mean ± standard error over seeds.

    python bench/cam_similarity.py runs/study-k2/*-k2-s* --split val
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile

from _runs import rebuilt

from gutout.train.evaluation import cam_similarity
from gutout.train.stats import estimate


def run_similarity(run: str, split: str, out: str) -> float:
    trainer = rebuilt(run, out)
    dataset = trainer.val_set if split == "val" else trainer.test_set
    if dataset is None:
        raise SystemExit(f"{run} has no validation split: use --split test")
    return cam_similarity(trainer.evaluator._maps(dataset))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished run directories of ensembles (K >= 2)")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    args = parser.parse_args(argv)
    arms = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as out:
        for run in args.runs:
            value = run_similarity(run, args.split, out)
            name = run.rstrip("/").split("/")[-1]
            print(f"{name}: {value:.4f}")
            arms[re.sub(r"-s\d+$", "", name)].append(value)
    print(f"\n| arm | seeds | members' map similarity ({args.split}) |\n|---|---|---|")
    for arm, values in arms.items():
        summary = estimate(values)
        spread = f" ± {summary.se:.3f}" if summary.n > 1 else ""  # one seed has no standard error
        print(f"| {arm} | {summary.n} | {summary.mean:.3f}{spread} |")


if __name__ == "__main__":
    main()
