"""The `gutout` command line: train, show, check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from gutout.cache import PEER_RULES
from gutout.config import ConfigError
from gutout.gradcam import TARGETS
from gutout.pipelines.datasets import DATASETS, CorruptImage
from gutout.plan import BOX_CENTERS, COLD_STARTS, KERNELS, POLICIES, THRESHOLD_RULES

from .config import (
    BACKENDS,
    DEVICES,
    EVAL_BATCH_SIZE,
    PRESETS,
    REFRESH_MODES,
    SCHEDULES,
    WANDB_MODES,
    TrainConfig,
    make_config,
    read_config_file,
    read_run_config,
)
from .models import MODELS


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _user_errors() -> tuple[type[Exception], ...]:
    """What a bad option, file, directory or run ends in: one line, no traceback (each message names the thing)."""
    from .rundir import ResumeMismatch, RunDirectoryBusy, RunDirectoryError
    from .trainer import NonFiniteLoss

    return ConfigError, ResumeMismatch, NonFiniteLoss, RunDirectoryBusy, RunDirectoryError, ValueError


def _interrupted(trainer) -> None:
    """Ctrl-C: say what is safe on disk and exit with the shell's status for SIGINT (128 + 2)."""
    note = trainer.checkpoint_note() if trainer is not None else "no run had started"
    click.echo(f"\ninterrupted: {note}", err=True)
    sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Gutout: Cutout that erases what the model (or its ensemble peers) finds important."""


def _float_or_noise(value):
    if value is None or value == "noise":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'noise'") from None


def _defaults() -> dict:
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def option(flag: str, help: str, *, default: str | None = None, **kwargs):
    """A `gutout train` option setting the TrainConfig field of the same name (dashes as underscores); its help
    ends with the field's default, read from TrainConfig (or `default`, where the field's None means "derived")."""
    field = flag.split("/")[0].lstrip("-").replace("-", "_")
    value = default if default is not None else _defaults()[field]
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    # click's own default stays None, flags included (a bare flag would default to False): an option not given
    # must not override the config file or the dataclass.
    return click.option(flag, field, help=f"{help} (default {value}).", default=None, **kwargs)


def _pair(ctx, param, value, kind=float):
    """'lo,hi' -> (lo, hi) of `kind`."""
    if value is None:
        return None
    try:
        lo, hi = (kind(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not two comma-separated numbers lo,hi") from None
    return lo, hi


@main.command()
@click.argument("dataset", type=click.Choice(tuple(DATASETS)))
@click.option("--data", type=click.Path(), help="Dataset folder (ImageFolder train/ val/, CIFAR pickles, idx files).")
@option("--ensemble", "Members K (1: self-Gutout; K > 1 cuts each member with its peers' maps)", type=int)
@option("--model", "Network", type=click.Choice(MODELS), default="the dataset's: small-resnet, resnet18 for folders")
@option("--width", "Channel multiplier of the CIFAR-style models", type=float)
@option("--epochs", "Epochs", type=int)
@option("--batch-size", "Batch size per member", type=int)
@option("--lr", "Peak learning rate", type=float)
@option("--momentum", "SGD Nesterov momentum", type=float)
@option("--weight-decay", "Weight decay (not on BatchNorm and biases)", type=float)
@option("--schedule", "Learning-rate schedule", type=click.Choice(SCHEDULES))
@option("--milestones", "Multistep epochs, comma-separated", default="50%,75% of --epochs")
@option("--lr-decay", "Multistep factor at each milestone", type=float)
@option("--label-smoothing", "Label smoothing", type=float)
@option("--preset", "The Cutout paper's hyperparameters", type=click.Choice(tuple(PRESETS)), default="none")
@option("--policy", "What to erase", type=click.Choice(POLICIES))
@option("--threshold", "threshold: erase where the warped saliency > T", type=float)
@option("--area", "area: erase the top fraction of pixels by saliency", type=float)
@option("--size", "box / cutout: the square's side as a fraction of the crop side", type=float)
@option("--box-center", "box: centre on the saliency peak, or sample it", type=click.Choice(BOX_CENTERS))
@option(
    "--threshold-rule",
    "threshold: fixed, sigma (mean + k std of each map), range (drawn per sample)",
    type=click.Choice(THRESHOLD_RULES),
)
@option("--k", "threshold-rule sigma: standard deviations above the map's mean", type=float)
@option("--threshold-range", "threshold-rule range: thresholds drawn from U(lo, hi)", callback=_pair)
@option("--gamma", "box sample: centres drawn with probability ∝ saliency^gamma", type=float)
@option("--erase-scale", "erasing: area range lo,hi of RandomErasing's rectangle", callback=_pair)
@option("--erase-ratio", "erasing: aspect-ratio range lo,hi", callback=_pair)
@option("--p", "Probability that a sample is cut", type=float)
@option(
    "--fill",
    "Fill value after normalisation (0 = the dataset mean), or 'noise'",
    callback=lambda ctx, param, v: _float_or_noise(v),
)
@option("--cold-start", "Samples without a map: Cutout of the same area, or none", type=click.Choice(COLD_STARTS))
@option("--kernel", "Cut implementation: auto = the device's fused kernel where it runs", type=click.Choice(KERNELS))
@option("--peers", "Whose maps cut a member's images", type=click.Choice(PEER_RULES), default="self (K = 1), others")
@option("--refresh", "How maps are refreshed", type=click.Choice(REFRESH_MODES))
@option("--refresh-every", "Refresh (pass) or publish (harvest) the maps every N epochs", type=int)
@option(
    "--refresh-fraction", "Each refresh pass after the first covers this fraction of the samples, in turn", type=float
)
@option(
    "--refresh-size",
    "Input side of the refresh pass in px (maps resampled to the cache's grid)",
    type=int,
    default="the input side",
)
@option("--cut-start", "No saliency cuts before this epoch (the cold-start rule before it)", type=int)
@option(
    "--p-ramp",
    "Epochs E1,E2: p rises linearly from 0 at E1 to --p at E2",
    default="none",
    callback=lambda ctx, param, v: None if v is None else _pair(ctx, param, v, int),
)
@option("--pair", "Train each cut sample's clean view in the same step too", is_flag=True, default="off")
@option(
    "--correct-only",
    "Use a map only where its owner classified the sample correctly (others: --cold-start)",
    is_flag=True,
    default="off",
)
@option("--diversity-loss", "SDDE penalty on the similarity of members' Grad-CAM maps, its weight", type=float)
@option("--target", "Grad-CAM target class", type=click.Choice(TARGETS))
@option("--backend", "Data pipeline", type=click.Choice(BACKENDS))
@option("--skip-corrupt", "Leave out image files that fail to decode", is_flag=True, default="off")
@option("--subset", "Train on a fixed seeded subset of N samples", type=int, default="all")
@option("--val-split", "Hold out N training samples for the per-epoch metrics; the test set is read once", type=int)
@option("--image-size", "Input side in px", type=int, default="the dataset's")
@option("--device", "Device", type=click.Choice(DEVICES))
@option("--amp/--no-amp", "Mixed precision and channels-last, on CUDA only", default="on")
@option("--num-threads", "DALI threads / DataLoader workers", type=int)
@option(
    "--eval-batch-size",
    "Batch size of evaluation and refresh",
    type=int,
    default="by device: " + ", ".join(f"{device} {size}" for device, size in EVAL_BATCH_SIZE.items()),
)
@option("--eval-every", "Score the per-epoch split every N epochs (and after the last)", type=int)
@option("--seed", "Seed", type=int)
@option("--wandb", "W&B mode", type=click.Choice(WANDB_MODES))
@option("--wandb-project", "W&B project")
@option("--out", "Folder of run directories", type=click.Path())
@option("--name", "Run name", default="<dataset>-k<K>-<policy>-s<seed>")
@option("--resume", "Continue from the run directory's last checkpoint", is_flag=True, default="off")
@option(
    "--init-from", "Start from another run's last weights (a new run and schedule)", type=click.Path(), default="none"
)
@option("--sample-grid", "Images in the per-epoch sample grid (0: none)", type=int)
@option("--checkpoint-every", "Also checkpoint every N steps inside an epoch", type=int, default="epoch ends only")
@option(
    "--checkpoint-minutes", "Also checkpoint every M minutes inside an epoch", type=float, default="epoch ends only"
)
@option("--log-every", "A step record every N steps", type=int, default="about 20 per epoch, at least every 50 steps")
@option("--progress/--no-progress", "Progress bars", default="on a terminal")
@click.option("--config", "config_file", type=click.Path(), help="YAML/TOML file of options (CLI options win).")
@click.option("--nproc", type=int, default=1, help="Local processes, launched by torch's elastic launcher (torchrun).")
@click.option("--max-restarts", type=int, default=0, help="With --nproc: restarts after a failed process.")
def train(dataset, config_file, milestones, nproc, max_restarts, **options):
    """Train a Gutout ensemble on DATASET (fashion-mnist, cifar10, cifar100, imagenet, folder)."""
    from .report import summary_table, tqdm_progress
    from .trainer import PREEMPTED_EXIT, Preempted, Trainer

    if milestones is not None:
        try:
            options["milestones"] = tuple(int(m) for m in milestones.split(","))
        except ValueError:
            _fail(f"--milestones {milestones!r} must be comma-separated integers")
    trainer = None
    try:
        file_values = read_config_file(config_file) if config_file else {}
        cfg = make_config(file_values, dataset=dataset, **options)
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            return launch(cfg, nproc, max_restarts)
        trainer = Trainer(cfg, log=click.echo)
        held_out = f" / {len(trainer.val_set)} val" if trainer.val_set is not None else ""
        trainer.log(
            f"run {cfg.run_dir}: {cfg.ensemble} x {cfg.model_name} on {cfg.dataset} ({len(trainer.train_set)} "
            f"train{held_out} / {len(trainer.test_set)} test), {trainer.backend} backend on {trainer.device}, "
            f"policy {cfg.policy}, peers {cfg.peer_rule}, refresh {cfg.refresh}"
        )
        final = trainer.run(progress=tqdm_progress(cfg.progress))
        trainer.runtime.close()
    except CorruptImage as err:
        _fail(err.message("--skip-corrupt"))
    except _user_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _interrupted(trainer)
    except Preempted as err:
        click.echo(f"\n{err}", err=True)
        sys.exit(PREEMPTED_EXIT)
    if not trainer.runtime.is_main:
        return
    click.echo("\n" + summary_table(final, cfg.ensemble))
    click.echo(
        f"\nrun directory: {cfg.run_dir} (metrics.jsonl, samples.png, curves.png, checkpoint.pt"
        f"{', wandb/' if cfg.wandb != 'disabled' else ''})"
    )


def launch(cfg, nproc: int, max_restarts: int) -> None:
    """Run `gutout train` in `nproc` local processes through torch's elastic launcher, as
    `torchrun --standalone --nproc-per-node N --max-restarts R -m gutout.train.cli train ...` would."""
    import signal
    import tempfile

    import yaml
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    from .trainer import PREEMPTED_EXIT, STOP_SIGNALS

    # The launcher passes the signals it handles on to every worker, then waits its shutdown timeout before
    # SIGKILL. Add the stop signals (SLURM's --signal sends SIGUSR1) to its list, and wait long enough for a step
    # and a checkpoint inside SLURM's two-minute warning; the environment's own settings win.
    # (torchrun's --signals-to-handle reads PET_SIGNALS_TO_HANDLE; launchers without that option read the other.)
    handled = ",".join(dict.fromkeys(["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", *(s.name for s in STOP_SIGNALS)]))
    for variable in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE"):
        os.environ.setdefault(variable, handled)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "100")
    values = cfg.to_dict()
    values["milestones"] = list(values["milestones"])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="gutout-launch-", delete=False) as f:
        yaml.safe_dump(values, f)
    click.echo(f"launching {nproc} processes (torch.distributed.run, max restarts {max_restarts})")
    try:
        torchrun(
            [
                "--standalone",
                "--nproc-per-node",
                str(nproc),
                "--max-restarts",
                str(max_restarts),
                "-m",
                "gutout.train.cli",
                "train",
                cfg.dataset,
                "--config",
                f.name,
            ]
        )
    except SignalException as err:  # the workers got the same signal and have exited (or were killed)
        if err.sigval in STOP_SIGNALS:
            click.echo(
                f"\nstopped by {err.sigval.name}: every rank stopped at the same step and checkpointed it; "
                f"continue with --resume (run directory {cfg.run_dir})",
                err=True,
            )
            sys.exit(PREEMPTED_EXIT)
        click.echo(f"\ninterrupted by {err.sigval.name}: continue from the last checkpoint with --resume", err=True)
        sys.exit(128 + signal.Signals(err.sigval).value)
    except Exception as err:  # noqa: BLE001 - the launcher's ChildFailedError, with the failing rank's report
        _fail(f"distributed run failed: {err}")
    finally:
        os.unlink(f.name)


DEFAULT_RUNS = "none,cutout,random-erasing,gutout-threshold,gutout-area,gutout-box"
# What `compare` changes from `train`'s defaults; a --config file overrides these, and options override both.
COMPARE_DEFAULTS = {"epochs": 4, "ensemble": 1, "out": "runs/compare", "wandb": "disabled"}
# Validation samples held out by default, per dataset (others: none unless --val-split says so).
COMPARE_VAL_SPLIT = {"fashion-mnist": 5000}


@main.command(context_settings={"show_default": True})
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--runs", default=DEFAULT_RUNS, help="Comma-separated arms; cutout, gutout-* take a value: cutout-0.25.")
@click.option("--seeds", default="3", help="A count (5 = seeds 0..4), a range (10-14) or a list (3,7,9).")
@click.option("--reference", help="Arm that paired differences are taken to (default: cutout, when it runs).")
@click.option("--split", type=click.Choice(["val", "test"]), help="Report on (default: val with a validation split).")
@click.option("--val-split", type=int, help="Validation samples held out (default 5000 for fashion-mnist, else 0).")
@click.option("--epochs", type=int, help=f"Epochs per run (default {COMPARE_DEFAULTS['epochs']}).")
@click.option("--ensemble", type=int, help=f"Members K per run (default {COMPARE_DEFAULTS['ensemble']}).")
@click.option("--subset", type=int, help="Train on a fixed seeded subset of N samples.")
@click.option("--data", type=click.Path())
@click.option("--model", type=click.Choice(MODELS))
@click.option("--width", type=float, help="Channel multiplier of the CIFAR-style models (default 1).")
@click.option("--batch-size", type=int)
@click.option("--eval-batch-size", type=int)
@click.option(
    "--p",
    "p",
    type=float,
    help="Cut probability of every cutting arm (default: Cutout 1, Random Erasing 0.5, Gutout train's 0.5).",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--backend", type=click.Choice(["auto", "dali", "tensor", "torch"]))
@click.option(
    "--out", type=click.Path(), help=f"Folder of the runs and of results.md (default {COMPARE_DEFAULTS['out']})."
)
@click.option(
    "--wandb",
    type=click.Choice(["offline", "online", "disabled"]),
    help=f"W&B mode (default {COMPARE_DEFAULTS['wandb']}).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(),
    help="YAML/TOML file of training options, and of named arms under `arms:` ({name: {option: value}}).",
)
@click.option("--time-budget", type=float, help="Start no new run after this many seconds (results from the rest).")
@click.option(
    "--records",
    type=click.Path(file_okay=False),
    help="Folder of finished runs' final records (config.yaml and the last metrics line, a few KB each): a run "
    "kept there counts as done, and every finished run is kept there. Commit it: tables outlive their runs.",
)
@click.option("--progress/--no-progress", default=None)
def compare(dataset, runs, seeds, reference, split, config_file, time_budget, records, p, **options):
    """Train each arm with each seed (finished runs are not repeated); write results.md/.png with paired statistics."""
    from .compare import Arms, parse_seeds, run_all, summarise, write_results
    from .report import tqdm_progress
    from .trainer import PREEMPTED_EXIT, Preempted

    run_names = [r.strip() for r in runs.split(",") if r.strip()]
    try:
        seed_list = parse_seeds(seeds)
        file_values = read_config_file(config_file) if config_file else {}
        arms = Arms.with_file(file_values.pop("arms", None), p)
        for run in run_names:
            arms.overrides(run, dataset)
        if reference is None:
            reference = "cutout" if "cutout" in run_names else None
        elif reference not in run_names:
            raise ConfigError(f"--reference {reference!r} is not one of the --runs ({', '.join(run_names)})")
        defaults = {**COMPARE_DEFAULTS, "val_split": COMPARE_VAL_SPLIT.get(dataset, 0)}
        base = make_config({**defaults, **file_values}, dataset=dataset, **options)
        split = split or ("val" if base.val_split else "test")
        if split == "val" and not base.val_split:
            raise ConfigError("--split val needs a validation split (--val-split N > 0)")
        results = run_all(
            base,
            run_names,
            seed_list,
            arms,
            log=click.echo,
            progress=tqdm_progress(base.progress),
            time_budget=time_budget,
            records=None if records is None else Path(records),
        )
    except CorruptImage as err:
        _fail(err.message("--skip-corrupt"))
    except _user_errors() as err:
        _fail(str(err))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: finished runs are kept; the same command continues the rest", err=True)
        sys.exit(130)
    except Preempted as err:  # SIGTERM / SIGUSR1: the run in progress checkpointed where it stopped
        click.echo(f"\n{err}\nfinished runs are kept; the same command resumes this one and runs the rest", err=True)
        sys.exit(PREEMPTED_EXIT)
    if not results:
        _fail("no run finished, so there is nothing to report (check --runs, --seeds and --time-budget)")
    command = "gutout compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else "gutout compare"
    rows = summarise(results, base, split, reference, arms)
    path = write_results(rows, base, Path(base.out), command, split, reference)
    click.echo(path.read_text())
    click.echo(f"wrote {path} and {path.with_suffix('.png')}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
def show(run):
    """Write the figures of a finished or running RUN directory (samples.png, curves.png) from its files."""
    import yaml

    from .figures import redraw
    from .rundir import ResumeMismatch

    run_dir = Path(run)
    try:
        saved = read_run_config(run_dir)
    except (OSError, yaml.YAMLError) as err:
        _fail(f"{run_dir} is not a gutout run directory ({err})")
    except ConfigError as err:
        _fail(f"{run_dir}: {err}")
    try:
        paths = redraw(run_dir, saved)
    except (ConfigError, ResumeMismatch, ValueError) as err:
        _fail(f"{run_dir}: {err}")
    for path in paths:
        click.echo(f"wrote {path}")


@main.command()
@click.argument("root", type=click.Path())
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--hash", "content_hash", is_flag=True, help="Also print a SHA-256 of every file's name and content.")
def check(root, workers, content_hash):
    """Check an image folder as `gutout train` reads it: a dataset root (ROOT/train and ROOT/val, as --data takes)
    or one ImageFolder (ROOT/<class>/<image>). Lists every structural problem and every file that fails to decode."""
    from gutout.pipelines.datasets import check_images, class_mismatch, content_digest, survey_folder

    root = Path(root)
    layout = (root / "train").is_dir()  # the --data layout of `gutout train imagenet/folder`
    folders = [root / "train", root / "val"] if layout else [root]
    datasets, problems = [], []
    for folder in folders:
        if layout and not folder.is_dir():
            problems.append(f"{folder} is missing (gutout train --data reads {root}/train and {root}/val)")
            continue
        dataset, found = survey_folder(folder)
        problems += found
        if dataset is not None:
            datasets.append(dataset)
    if layout and len(datasets) == 2 and class_mismatch(*datasets):
        problems.append(class_mismatch(*datasets))
    bad = [b for dataset in datasets for b in check_images(dataset, workers=workers)]
    for problem in problems:
        click.echo(problem)
    for b in bad:
        click.echo(f"{b.path}: {b.reason}")
    files = sum(len(d) for d in datasets)
    summary = f"{files} files, {len(bad)} bad, {len(problems)} structural problem{'s' * (len(problems) != 1)}"
    click.echo(summary + ("; train with --skip-corrupt to leave the bad files out" if bad else ""))
    if content_hash:
        click.echo(f"content sha256 {content_digest(datasets)} (file names, in order, and their bytes)")
    sys.exit(1 if bad or problems else 0)


if __name__ == "__main__":
    main()
