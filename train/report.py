"""What a run prints: metric keys under their split, the line per epoch, the summary table, progress bars."""

from __future__ import annotations

import sys

from .evaluation import OCCLUSIONS


def eval_split(record: dict) -> str:
    """The split a record's per-epoch metrics were computed on."""
    return "val" if "val/ensemble/acc" in record else "test"


def epoch_line(record: dict, members: int) -> str:
    split = eval_split(record)
    scores = "not scored (--eval-every)"
    if f"{split}/ensemble/acc" in record:
        accs = " ".join(f"{100 * record[f'{split}/member/{m}/acc']:.2f}" for m in range(members))
        scores = (
            f"{split} members {accs} | ensemble {100 * record[f'{split}/ensemble/acc']:.2f}% "
            f"| disagreement {100 * record[f'{split}/ensemble/disagreement']:.1f}%"
        )
    return (
        f"epoch {record['epoch']}: {scores} | erased {100 * record['gutout/erased_frac']:.1f}% "
        f"| {record['throughput/train_img_per_s']:.0f} img/s | refresh {record['time/refresh_s']:.1f} s"
    )


def summary_table(record: dict, members: int) -> str:
    """The end-of-run summary as a Markdown table: the test set, and the validation split when there is one."""
    splits = [s for s in ("val", "test") if f"{s}/ensemble/acc" in record]
    head = "| model | " + " | ".join(f"{s} acc (%) | {s} NLL" for s in splits) + " |"
    lines = [head, "|---|" + "---|---|" * len(splits)]
    for name, key in [(f"member {m}", f"member/{m}") for m in range(members)] + [("ensemble", "ensemble")]:
        cells = [f"{100 * record[f'{s}/{key}/acc']:.2f} | {record[f'{s}/{key}/nll']:.3f}" for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    final = splits[-1]
    occluded = " / ".join(f"{100 * record[f'{final}/ensemble/occlusion/{o}_acc']:.1f}" for o in OCCLUSIONS)
    scaled = record.get(f"{final}/ensemble/ece_ts")
    calibration = f"ensemble ECE {100 * record[f'{final}/ensemble/ece']:.2f}%"
    if scaled is not None:
        calibration += f" ({100 * scaled:.2f}% after temperature scaling)"
    lines += [
        "",
        f"{final}: {calibration} | disagreement {100 * record[f'{final}/ensemble/disagreement']:.2f}% "
        f"| occluded acc random / salient / salient box {occluded}%",
        f"erased fraction {100 * record['gutout/erased_frac']:.1f}% "
        f"| {record['throughput/train_img_per_s']:.0f} train img/s (all members) "
        f"| loader wait {100 * record['throughput/loader_wait_frac']:.1f}% | {record['time/run_s']:.0f} s in all",
    ]
    return "\n".join(lines)


class NoProgress:
    """A drop-in for tqdm's constructor that shows nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def tqdm_progress(enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return NoProgress
    from tqdm import tqdm

    return tqdm
