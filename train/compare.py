"""`gutout compare`: every configuration x every seed, sequentially and resumably; then results.md/.png.

Each configuration is a set of TrainConfig overrides. Cutout uses the paper's square for the dataset; Random
Erasing uses torchvision's RandomErasing semantics through the same stage; `gutout-area` erases the area
Cutout's square covers on average (clipped at the border), so the two compare at matched erased area.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gutout.atomic import atomic_write_bytes
from gutout.config import ConfigError
from gutout.pipelines.datasets import DATASETS

from .config import TrainConfig, identity_differences, read_run_config
from .stats import Estimate, estimate, paired_difference
from .tracking import read_metrics

CUTOUT_SIZE = {name: spec.cutout_side for name, spec in DATASETS.items()}  # Cutout's side, from the registry


def cutout_erased_fraction(side: float) -> float:
    """Expected fraction of the crop that a Cutout square of `side` (fraction of the crop side) covers.

    The centre is uniform over the crop and the square is clipped at the border, so along each axis it loses
    side²/8 on average at either end: side - side²/4 per axis (0.4375 for side 0.5, an area of 0.191 rather
    than the nominal 0.25).
    """
    if not 0 < side <= 1:
        raise ConfigError(f"Cutout side {side!r} must lie in (0, 1]")
    return (side - side * side / 4) ** 2


# The arms `compare` knows: TrainConfig overrides, and the one knob a numeric suffix sets ("cutout-0.25" is Cutout with
# side 0.25, "gutout-area-0.1" erases the top 10 %). The baselines keep their published cut probability (Cutout and
# KeepAugment's Cutout: every image; torchvision's RandomErasing: half); the Gutout arms take the trainer's `p`; `--p`
# sets every arm's. Defaults: Cutout's side for the dataset; gutout-area erases the area Cutout's square covers on
# average, so the two compare at matched erased area. A compare config file may name more arms (`arms:`).
ARMS = {
    "none": (dict(policy="none"), None),
    "cutout": (dict(policy="cutout", p=1.0), "size"),
    "random-erasing": (dict(policy="erasing", p=0.5), None),
    "keep": (dict(policy="keep", p=1.0), "size"),  # KeepAugment: Cutout's square, off the salient pixels
    "gutout-threshold": (dict(policy="threshold"), "threshold"),
    "gutout-sigma": (dict(policy="threshold", threshold_rule="sigma"), "k"),  # MaskTune's mean + k sigma
    "gutout-range": (dict(policy="threshold", threshold_rule="range"), None),  # WS-DAN's drawn threshold
    "gutout-correct": (dict(policy="threshold", correct_only=True), "threshold"),  # maps of correct samples only
    "gutout-area": (dict(policy="area"), "area"),
    "gutout-box": (dict(policy="box"), "size"),
    "diversity": (dict(policy="none", diversity_loss=0.005), "diversity_loss"),  # SDDE's weight
}


@dataclass(frozen=True)
class Arms:
    """The arms of one comparison: ARMS and the config file's, with `p` (when given) for every cutting arm."""

    table: dict = field(default_factory=lambda: dict(ARMS))
    p: float | None = None

    @classmethod
    def with_file(cls, named: dict | None, p: float | None = None) -> Arms:
        """ARMS plus the arms a config file names ({name: {option: value}}), which take no knob."""
        table = dict(ARMS)
        for name, overrides in (named or {}).items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"arm {name!r} must map option names to values, got {overrides!r}")
            table[name] = ({k.replace("-", "_"): v for k, v in overrides.items()}, None)
        return cls(table, p)

    def overrides(self, run: str, dataset: str) -> dict[str, Any]:
        """The TrainConfig overrides of arm `run` (a name, optionally with "-<knob value>")."""
        name, knob_value = run, None
        if run not in self.table and "-" in run:
            head, tail = run.rsplit("-", 1)
            try:
                name, knob_value = head, float(tail)
            except ValueError:
                pass
        if name not in self.table:
            raise ConfigError(
                f"unknown comparison run {run!r}; runs: {', '.join(self.table)} "
                "(those with a knob take a value too: cutout-0.25, gutout-area-0.1)"
            )
        overrides, knob = self.table[name]
        overrides = dict(overrides)
        size = CUTOUT_SIZE[dataset]
        if overrides.get("policy") in ("cutout", "box", "keep"):
            overrides.setdefault("size", size)
        if overrides.get("policy") == "area":
            overrides.setdefault("area", cutout_erased_fraction(size))  # Cutout's erased area
        if knob_value is not None:
            if knob is None:
                raise ConfigError(f"comparison run {name!r} takes no value, got {run!r}")
            overrides[knob] = knob_value
        if self.p is not None and overrides.get("policy", "none") != "none":
            overrides["p"] = self.p
        return overrides

    def config(self, base: TrainConfig, run: str, seed: int) -> TrainConfig:
        name = f"{base.dataset}-{run}-k{base.ensemble}-s{seed}"
        return dataclasses.replace(base, **self.overrides(run, base.dataset), seed=seed, name=name)


def run_overrides(run: str, dataset: str, p: float | None = None) -> dict[str, Any]:
    """The TrainConfig overrides of a built-in arm (see ARMS)."""
    return Arms(p=p).overrides(run, dataset)


def parse_seeds(text: str | int) -> list[int]:
    """--seeds: a count ("5" = 0..4), a range ("10-14") or a list ("3,7,9")."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        elif "-" in text.lstrip("-"):
            lo, hi = (int(s) for s in text.split("-"))
            if hi < lo:
                raise ValueError
            seeds = list(range(lo, hi + 1))
        else:
            seeds = list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must be a count (5), a range (10-14) or a list of distinct seeds (3,7,9)")
    return seeds


def check_same_run(cfg: TrainConfig, run_dir: Path | None = None) -> None:
    """Refuse a run directory (default: cfg's) that holds another configuration's run, rather than report or
    resume it."""
    run_dir = cfg.run_dir if run_dir is None else run_dir
    if not (run_dir / "config.yaml").exists():
        return
    saved = read_run_config(run_dir).identity()
    diffs = [f"{k}={there!r} there, {here!r} here" for k, there, here in identity_differences(saved, cfg.identity())]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a run of another configuration ({'; '.join(diffs)}); "
            "pass another --out, or move that run directory away"
        )


def finished(cfg: TrainConfig, run_dir: Path | None = None) -> dict | None:
    """The final metrics record of a completed run in `run_dir` (default: cfg's), or None."""
    run_dir = cfg.run_dir if run_dir is None else run_dir
    check_same_run(cfg, run_dir)
    records, _ = read_metrics(run_dir)
    return records[-1] if records and records[-1].get("epoch") == cfg.epochs - 1 else None


def keep_record(cfg: TrainConfig, record: dict, records: Path) -> None:
    """Write a finished run's final record where `--records` keeps it: records/<run name>/ holds the run's
    config.yaml and a metrics.jsonl of that one line, a few kilobytes that `finished` reads like the run itself
    (checkpoints, step records and figures stay in the run directory)."""
    kept = records / cfg.run_name
    kept.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(kept / "config.yaml", (cfg.run_dir / "config.yaml").read_bytes())
    atomic_write_bytes(kept / "metrics.jsonl", (json.dumps(record) + "\n").encode())


def run_all(
    base: TrainConfig,
    runs: list[str],
    seeds: list[int],
    arms: Arms | None = None,
    log=print,
    progress=None,
    time_budget: float | None = None,
    records: Path | None = None,
) -> dict[str, dict[int, dict]]:
    """Train what is missing (resuming interrupted runs); returns {run: {seed: final record}}.

    Seed-major order (every run for seed 0, then seed 1, ...), so that when `time_budget` seconds are spent
    and no further run starts, every configuration still has its first seeds. With `records` (a folder), a run
    finished there counts as done, and every run finished here is kept there (keep_record).
    """
    from .trainer import Trainer

    arms = arms or Arms()
    start = time.monotonic()
    results: dict[str, dict[int, dict]] = {run: {} for run in runs}
    for seed in seeds:
        for run in runs:
            cfg = arms.config(base, run, seed)
            record = finished(cfg)
            if record is None and records is not None:
                record = finished(cfg, records / cfg.run_name)
                if record is not None:
                    log(f"== {cfg.run_name}: done already (kept in {records})")
                    results[run][seed] = record
                    continue
            if record is None:
                if time_budget is not None and time.monotonic() - start > time_budget:
                    log(f"== {cfg.run_name}: skipped, the time budget of {time_budget:.0f} s is spent")
                    continue
                resume = (cfg.run_dir / "config.yaml").exists()  # interrupted: continue it (check_same_run passed)
                log(f"== {cfg.run_name}" + (" (resuming)" if resume else ""))
                record = Trainer(dataclasses.replace(cfg, resume=resume), log=log).run(progress=progress)
            else:
                log(f"== {cfg.run_name}: done already")
            if records is not None:
                keep_record(cfg, record, records)
            results[run][seed] = record
    return {run: records for run, records in results.items() if records}


# The columns of a results table: (key in a row, header, how a value prints). Ensemble metrics; for K = 1 the
# ensemble is the single model.
COLUMNS = [
    ("error", "error (%)", 2),
    ("nll", "NLL", 3),
    ("ece", "ECE (%)", 2),
    ("nll_ts", "NLL, T-scaled", 3),
    ("ece_ts", "ECE, T-scaled (%)", 2),
    ("occluded_random", "acc., random square occluded (%)", 1),
    ("occluded_salient", "acc., top 20 % salient occluded (%)", 1),
    ("occluded_box", "acc., salient box occluded (%)", 1),
    ("erased", "erased in training (%)", 1),
]
ENSEMBLE_COLUMNS = [
    ("member_error", "mean member error (%)", 2),
    ("disagreement", "disagreement (%)", 2),
    ("gain", "ensemble − mean member acc. (pp)", 2),
    ("cam_similarity", "members' map similarity", 3),  # runs older than the metric leave it out
]


def row_values(record: dict, split: str, ensemble: int) -> dict[str, float]:
    """One run's numbers for the table's columns, from its final record, on `split`."""
    e = f"{split}/ensemble"
    values = {
        "error": 100 * (1 - record[f"{e}/acc"]),
        "nll": record[f"{e}/nll"],
        "ece": 100 * record[f"{e}/ece"],
        "occluded_random": 100 * record[f"{e}/occlusion/random_acc"],
        "occluded_salient": 100 * record[f"{e}/occlusion/salient_acc"],
        "occluded_box": 100 * record[f"{e}/occlusion/salient_box_acc"],
        "erased": 100 * record["gutout/erased_frac"],
        "minutes": record["time/run_s"] / 60,
        "img_per_s": record["throughput/train_img_per_s"],
    }
    if f"{e}/nll_ts" in record:  # temperature scaling needs a validation split to fit on
        values["nll_ts"], values["ece_ts"] = record[f"{e}/nll_ts"], 100 * record[f"{e}/ece_ts"]
    if ensemble > 1:
        member_acc = statistics.fmean(record[f"{split}/member/{m}/acc"] for m in range(ensemble))
        values["member_error"] = 100 * (1 - member_acc)
        values["disagreement"] = 100 * record[f"{e}/disagreement"]
        values["gain"] = 100 * record[f"{e}/gain_over_mean_member"]
        if f"{e}/cam_similarity" in record:
            values["cam_similarity"] = record[f"{e}/cam_similarity"]
    return values


def summarise(
    results: dict[str, dict[int, dict]], base: TrainConfig, split: str, reference: str | None, arms: Arms | None = None
) -> list[dict]:
    """One row per run: its cut probability, an Estimate (mean ± s.e. over seeds) per column, and the paired
    difference of its error to the reference run's over the seeds both have."""
    ensemble = base.ensemble
    per_seed = {
        run: {seed: row_values(r, split, ensemble) for seed, r in records.items()} for run, records in results.items()
    }
    rows = []
    for run, seeds in per_seed.items():
        cfg = (arms or Arms()).config(base, run, 0)
        cuts = cfg.policy != "none"  # an arm that cuts nothing (none, the diversity loss alone) has no p
        row: dict[str, Any] = {"run": run, "seeds": sorted(seeds), "p": cfg.p if cuts else None}
        for key in seeds[next(iter(seeds))]:
            row[key] = estimate([values[key] for values in seeds.values()])
        if reference is not None and reference in per_seed and run != reference:
            row["delta_error"] = paired_difference(
                {s: v["error"] for s, v in seeds.items()}, {s: v["error"] for s, v in per_seed[reference].items()}
            )
        rows.append(row)
    return rows


def _fmt(value: Estimate | None, digits: int) -> str:
    if value is None:
        return "–"
    if value.n < 2:
        return f"{value.mean:.{digits}f}"
    return f"{value.mean:.{digits}f} ± {value.se:.{digits}f}"


def _fmt_delta(delta: Estimate | None) -> str:
    if delta is None:  # no seed in common with the reference
        return "–"
    if delta.n < 2:
        return f"{delta.mean:+.2f} (1 seed)"
    text = f"{delta.mean:+.2f} [{delta.lo:+.2f}, {delta.hi:+.2f}]"
    return f"**{text}**" if delta.excludes_zero else text


def split_description(base: TrainConfig, split: str) -> str:
    if split == "val":
        return f"the validation split ({base.val_split} training samples held out, stratified; chosen on)"
    if base.val_split:
        return "the test set, evaluated once after the last epoch (settings were chosen on the validation split)"
    return "the test set, which was also evaluated after every epoch (no validation split)"


def results_markdown(
    rows: list[dict], base: TrainConfig, command: str, split: str, reference: str | None, extra: str = ""
) -> str:
    ensemble = base.ensemble
    data = "full training set" if base.subset is None else f"{base.subset}-sample subset"
    if base.val_split:
        data += f" (after holding out {base.val_split} for validation)"
    width = f" × {base.width} width" if base.width != 1 else ""
    scale = (
        f"{base.dataset}, {data}, {base.model_name}{width}, {base.epochs} epochs ({base.schedule} schedule), "
        f"batch {base.batch_size}, K = {ensemble}"
    )
    columns = [c for c in COLUMNS + (ENSEMBLE_COLUMNS if ensemble > 1 else []) if any(c[0] in r for r in rows)]
    head = ["run", "p", "seeds", f"Δ error vs {reference} (pp) [95 % CI]" if reference else None]
    head = [h for h in head if h] + [c[1] for c in columns] + ["minutes per run", "train img/s"]
    lines = [
        f"# Does Gutout work? ({base.dataset})",
        "",
        f"Scale: {scale}.",
        "",
        f"Metrics on {split_description(base, split)}.",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [row["run"], "–" if row["p"] is None else f"{row['p']:g}", ",".join(map(str, row["seeds"]))]
        if reference:
            cells.append("reference" if row["run"] == reference else _fmt_delta(row.get("delta_error")))
        cells += [_fmt(row.get(key), digits) for key, _, digits in columns]
        cells += [_fmt(row["minutes"], 1), _fmt(row["img_per_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    paired = (
        f"Δ error: the mean over seeds of (run − {reference}) with the same seed (same initialisation, data order "
        "and subset), with a Student-t 95 % confidence interval; **bold** where it excludes 0. "
    )
    lines += [
        "",
        "p: the probability that a training image is cut. Mean ± standard error over seeds. Error, NLL, ECE and "
        "occluded accuracies are the ensemble's (mean softmax; the single model when K = 1); T-scaled: after one "
        "temperature fitted on the validation split. " + (paired if reference else "") + "Minutes per run: wall time "
        "from the first step to the last metric, on the machine that ran it.",
        "",
        "Anchors from the literature, at far larger budgets: Random Erasing on Fashion-MNIST, ResNet-20: 4.39 % → "
        "4.02 % error (300 epochs); WRN-28-10: 4.01 % → 3.65 % (Zhong et al. 2020).",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def results_figure(rows: list[dict], path: Path, title: str, reference: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("error", "error (%)"),
        ("delta_error", f"Δ error vs {reference} (pp), 95 % CI"),
        ("occluded_salient", "acc., salient occluded (%)"),
    ]
    if "disagreement" in rows[0]:
        panels.append(("disagreement", "disagreement (%)"))
    if reference is None:
        panels.pop(1)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    x = range(len(rows))
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = [r.get(key) for r in rows]
        means = [v.mean if v is not None else math.nan for v in values]
        if key == "delta_error":  # a confidence interval, not a standard error
            low = [v.mean - v.lo if v is not None and v.n > 1 else 0 for v in values]
            high = [v.hi - v.mean if v is not None and v.n > 1 else 0 for v in values]
            colours = ["C3" if v is not None and v.excludes_zero else "C7" for v in values]
            ax.bar(x, means, yerr=[low, high], capsize=3, color=colours)
            ax.axhline(0, color="k", lw=0.8)
        else:
            errors = [v.se if v is not None and v.n > 1 else 0 for v in values]
            ax.bar(x, means, yerr=errors, capsize=3, color=[f"C{i}" for i in x])
            finite = [(m - e, m + e) for m, e in zip(means, errors, strict=True) if math.isfinite(m)]
            if finite:
                lo, hi = min(f[0] for f in finite), max(f[1] for f in finite)
                pad = max((hi - lo) * 0.3, 1e-3)
                ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_xticks(list(x), [r["run"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(
    rows: list[dict], base: TrainConfig, out_dir: Path, command: str, split: str, reference: str | None, extra: str = ""
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = results_markdown(rows, base, command, split, reference, extra)
    atomic_write_bytes(out_dir / "results.md", text.encode())
    title = f"{base.dataset}, {base.model_name}, K = {base.ensemble}, {base.epochs} epochs, {split} split"
    results_figure(rows, out_dir / "results.png", title, reference)
    return out_dir / "results.md"
