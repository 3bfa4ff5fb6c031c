"""The regime screen's table and figure from its run directories (bench/regime_screen.sh writes them).

For every cell (a `gutout compare` output folder) and arm: the paired difference of its validation error to `none`
over the seeds both have (mean and Student-t 95 % interval), its validation error, and its minutes per run; with
`--split test`, the same on the test set (read once, for the chosen cells only).

    python bench/screen_report.py runs/screen --figure docs/regime-screen.png [--split val|test] [--cells a,b]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gutout.train.stats import estimate, paired_difference


def final_records(cell: Path) -> dict[str, dict[int, dict]]:
    """{arm: {seed: last metrics record}} of a cell folder's finished runs (named <dataset>-<arm>-k1-s<seed>)."""
    runs: dict[str, dict[int, dict]] = {}
    for metrics in sorted(cell.glob("*/metrics.jsonl")):
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if not records or "time/run_s" not in records[-1] or not any(k.startswith("test/") for k in records[-1]):
            continue  # unfinished
        name = metrics.parent.name  # e.g. fashion-mnist-cutout-0.25-k1-s2
        stem, seed = name.rsplit("-s", 1)
        arm = stem.removeprefix("fashion-mnist-").rsplit("-k", 1)[0]
        runs.setdefault(arm, {})[int(seed)] = records[-1]
    return runs


def rows(cell: Path, split: str) -> list[dict]:
    runs = final_records(cell)
    error = {arm: {s: 100 * (1 - r[f"{split}/ensemble/acc"]) for s, r in seeds.items()} for arm, seeds in runs.items()}
    out = []
    for arm, seeds in runs.items():
        row = {
            "cell": cell.name,
            "arm": arm,
            "seeds": sorted(seeds),
            "error": estimate(list(error[arm].values())),
            "minutes": estimate([r["time/run_s"] / 60 for r in seeds.values()]),
            "salient": estimate([100 * r[f"{split}/ensemble/occlusion/salient_acc"] for r in seeds.values()]),
        }
        if arm != "none" and "none" in error:
            row["delta"] = paired_difference(error[arm], error["none"])
        out.append(row)
    order = {"none": 0}
    return sorted(out, key=lambda r: (order.get(r["arm"], 1), r["arm"]))


def markdown(all_rows: list[dict], split: str) -> str:
    lines = [
        f"| cell | arm | seeds | Δ {split} error vs none (pp) [95 % CI] | {split} error (%) | "
        f"acc., top 20 % salient occluded (%) | minutes per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in all_rows:
        d = r.get("delta")
        delta = "reference" if d is None else f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}]"
        if d is not None and d.excludes_zero:
            delta = f"**{delta}**"
        lines.append(
            f"| {r['cell']} | {r['arm']} | {len(r['seeds'])} | {delta} | {r['error'].mean:.2f} ± {r['error'].se:.2f} "
            f"| {r['salient'].mean:.1f} | {r['minutes'].mean:.1f} |"
        )
    return "\n".join(lines)


def figure(all_rows: list[dict], path: Path, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in all_rows if "delta" in r]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown) + 2), 4))
    x = range(len(shown))
    means = [r["delta"].mean for r in shown]
    errors = [[r["delta"].mean - r["delta"].lo for r in shown], [r["delta"].hi - r["delta"].mean for r in shown]]
    colours = ["C2" if r["delta"].hi < 0 else "C3" if r["delta"].lo > 0 else "C7" for r in shown]
    ax.bar(x, means, yerr=errors, capsize=3, color=colours)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(list(x), [f"{r['cell']}\n{r['arm']}" for r in shown], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(f"Δ {split} error vs none (pp), paired 95 % CI")
    ax.set_title("Regime screen: below 0 = the eraser helps (green or red: the interval excludes 0)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("screen", type=Path, help="the folder of the cells (bench/regime_screen.sh's OUT)")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--cells", help="comma-separated cells (default: every folder under SCREEN)")
    parser.add_argument("--figure", type=Path, help="write the bar chart here")
    args = parser.parse_args()
    cells = [args.screen / c for c in args.cells.split(",")] if args.cells else sorted(args.screen.iterdir())
    all_rows = [row for cell in cells if cell.is_dir() for row in rows(cell, args.split)]
    print(markdown(all_rows, args.split))
    if args.figure:
        figure(all_rows, args.figure, args.split)
        print(f"\nwrote {args.figure}")


if __name__ == "__main__":
    main()
