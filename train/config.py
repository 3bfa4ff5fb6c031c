"""TrainConfig: every option of `gutout train`, validated; from the CLI, a YAML/TOML file, or both."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from gutout.cache import PEER_RULES
from gutout.config import ConfigError, check_choice, check_range, from_mapping
from gutout.gradcam import TARGETS
from gutout.pipelines import LoaderConfig
from gutout.pipelines.datasets import DATASETS
from gutout.plan import CutConfig

from .models import CIFAR_NETS, MODELS, min_image_size

SCHEDULES = ("cosine", "multistep")
REFRESH_MODES = ("pass", "harvest")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("offline", "online", "disabled")
BACKENDS = ("auto", "dali", "tensor", "torch")

# The Cutout paper's CIFAR recipe (DeVries & Taylor 2017): SGD + Nesterov, lr 0.1, wd 5e-4, batch 128,
# 200 epochs, lr x 0.2 at epochs 60, 120, 160; a 16 px square on 32 px images.
CUTOUT_PAPER = dict(
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    batch_size=128,
    epochs=200,
    schedule="multistep",
    milestones=(60, 120, 160),
    lr_decay=0.2,
    policy="cutout",
    size=0.5,
)
PRESETS = {"cutout-paper": CUTOUT_PAPER}

# The batch of the passes without a gradient step (evaluation, the saliency refresh) by device type, when
# --eval-batch-size is not given. CPU: bench/eval_batch.py's fastest on a 2-core machine (batch 128; 1024 took
# 1.84x as long, docs/eval-batch-2026-12-02-cpu.md). CUDA: large batches keep the device busy; 1024 is not
# re-measured here (`bench/eval_batch.py --device cuda` does).
EVAL_BATCH_SIZE = {"cpu": 128, "cuda": 1024}


@dataclass(frozen=True)
class TrainConfig(CutConfig):
    """Every option of a training run. The cut's options are CutConfig's fields (inherited, validated there);
    the loader's take LoaderConfig's defaults; the rest are the trainer's own."""

    # The trainer cuts half the samples (the library's CutConfig cuts every one it is given): erasing the most
    # salient region of every image hid the object too often (Fashion-MNIST, 20k samples, 2 epochs, self-Gutout at
    # t = 0.5: 50.4 % test accuracy at p = 1, 73.7 % at 0.5).
    p: float = 0.5
    dataset: str = "fashion-mnist"
    data: str | None = None  # dataset folder; fashion-mnist falls back to Debian's package, then a download
    ensemble: int = 1  # K members; K = 1 is self-Gutout, K > 1 cuts each member with its peers' saliency
    model: str | None = None  # None: the dataset's default (small-resnet for 28-32 px, resnet18 for image folders)
    width: float = 1.0  # channel multiplier of the CIFAR-style nets (capacity without depth)
    epochs: int = 10
    batch_size: int = LoaderConfig.batch_size
    lr: float = 0.1  # peak learning rate for batch_size (linearly warmed up over the first 2% of steps)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" to zero, or "multistep" (x lr_decay at each milestone epoch)
    milestones: tuple[int, ...] = ()
    lr_decay: float = 0.2
    label_smoothing: float = 0.0
    preset: str | None = None  # "cutout-paper": the Cutout paper's hyperparameters (explicit options win)
    peers: str | None = None  # None: "self" for K = 1, "others" for K > 1
    # "harvest": each step's true-class CAM of the training view, warped back to the canonical frame (no extra
    # forward); "pass": Grad-CAM over the training set after the epoch. Harvest is the default: it lost no measurable
    # accuracy against the pass at K = 1 or K = 2 (5 paired seeds each, docs/results-harvest-k1-cpu.md and
    # docs/results-harvest-k2-cpu.md) and saves the pass, a fifth of a peer-Gutout run's time in that regime.
    refresh: str = "harvest"
    refresh_every: int = 1
    # Each refresh pass after the first covers this fraction of the samples, in turn (1/F must be a whole number):
    # a map is at most 1/F refreshes old, and a pass costs F of a full one.
    refresh_fraction: float = 1.0
    # Input side of the refresh pass in px (None: image_size): a smaller one makes a cheaper pass whose coarser maps
    # are resampled to the cache's grid (image folders: 7 x 7 at 224 px, 5 x 5 at 160).
    refresh_size: int | None = None
    # No saliency cuts before epoch `cut_start`: the first maps are computed at its start, and the epochs before it
    # follow the cold-start rule (Cutout of the same area, or nothing). 0 with a refresh pass: maps of the untrained
    # model from epoch 0 (harvest has its first maps after epoch 0, as with 1).
    cut_start: int = 1
    # (E1, E2): the cut probability rises linearly from 0 at epoch E1 to `p` at E2; nothing is cut before E1.
    p_ramp: tuple[int, int] | None = None
    # Train every cut sample's clean view in the same step too (the batch holds both: more compute per step).
    pair: bool = False
    # Use a map only where its owner classified the sample correctly when the map was made; the other samples
    # follow the cold-start rule, as samples without a map do.
    correct_only: bool = False
    # λ of the SDDE penalty: λ x the mean cosine similarity of a member's true-class CAM and its peers' on its batch
    # (train/diversity.py). 0: none. Ensembles (K >= 2), in one process or several (--nproc).
    diversity_loss: float = 0.0
    target: str = "label"  # Grad-CAM target: the true label, or "pred"
    backend: str = LoaderConfig.backend
    skip_corrupt: bool = False  # image folders: decode every file once and leave out those that fail
    subset: int | None = None  # train on a fixed seeded subset of N samples (the full test set still evaluates)
    # Hold out N training samples (stratified, the same for every seed): per-epoch metrics are computed on them and
    # the test set is read once, after the last epoch. 0: no split; per-epoch metrics are on the test set.
    val_split: int = 0
    image_size: int | None = None  # None: the dataset's (its arrays' own size, or FOLDER_IMAGE_SIZE for folders)
    device: str = "auto"  # "auto": cuda when available, else cpu
    amp: bool = True  # mixed precision and channels-last, on CUDA only
    num_threads: int = LoaderConfig.num_threads
    eval_batch_size: int | None = None  # None: EVAL_BATCH_SIZE of the run's device type
    # Score the per-epoch split (val, else test) every N epochs, and always after the last; the epochs between log
    # training metrics only. For long runs where evaluation is a large share of an epoch (a small training subset).
    eval_every: int = 1
    seed: int = 0
    wandb: str = "offline"  # "offline" (the run lands in the run directory), "online", or "disabled"
    wandb_project: str = "gutout"
    out: str = "runs"  # run directories are created under this folder
    name: str | None = None  # run name; None: <dataset>-k<K>-<policy>-s<seed>
    resume: bool = False
    init_from: str | None = None  # a run directory: start from its last checkpoint's weights (a new run and schedule)
    sample_grid: int = 6  # images in the per-epoch sample grid (0: none)
    # A step record every N optimiser steps (metrics.jsonl and W&B). None: about 20 per epoch, at least every 50
    # steps. Each reads the accumulated losses once (one synchronisation per record, not per step).
    log_every: int | None = None
    # Also checkpoint every N optimiser steps inside an epoch (a preempted or killed run loses at most N steps).
    # None: at epoch ends, and when SIGTERM / SIGUSR1 asks the run to stop.
    checkpoint_every: int | None = None
    # ... or every M minutes of wall time (with several ranks, when any rank's clock says so: one all-reduce).
    checkpoint_minutes: float | None = None
    progress: bool | None = None  # progress bars; None: when stderr is a terminal

    def __post_init__(self):
        super().__post_init__()  # the types of every field, and the cut's options
        name = "TrainConfig"
        check_choice(name, "dataset", self.dataset, tuple(DATASETS))
        if self.model is not None:
            check_choice(name, "model", self.model, MODELS)
        check_choice(name, "schedule", self.schedule, SCHEDULES)
        check_choice(name, "refresh", self.refresh, REFRESH_MODES)
        check_choice(name, "target", self.target, TARGETS)
        check_choice(name, "backend", self.backend, BACKENDS)
        check_choice(name, "device", self.device, DEVICES)
        check_choice(name, "wandb", self.wandb, WANDB_MODES)
        if self.peers is not None:
            check_choice(name, "peers", self.peers, PEER_RULES)
            if self.peers == "others" and self.ensemble < 2:
                raise ConfigError("TrainConfig.peers='others' needs --ensemble >= 2 (one member can only use 'self')")
        if self.preset is not None:
            check_choice(name, "preset", self.preset, tuple(PRESETS))
        minimums = dict(
            ensemble=1,
            epochs=1,
            batch_size=1,
            refresh_every=1,
            eval_every=1,
            num_threads=0,
            cut_start=0,
            sample_grid=0,
            val_split=0,
        )
        for key, lo in minimums.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ConfigError(f"{name}.{key}={value!r} must be an integer >= {lo}")
        for key in ("log_every", "checkpoint_every", "eval_batch_size", "refresh_size"):  # None: automatic
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name}.{key}={value!r} must be an integer >= 1")
        if self.subset is not None and (not isinstance(self.subset, int) or self.subset < 1):
            raise ConfigError(f"{name}.subset={self.subset!r} must be a positive integer")
        smallest = min_image_size(self.model_name)
        if self.image_size is not None and self.image_size < smallest:
            raise ConfigError(
                f"{name}.image_size={self.image_size!r} is too small for {self.model_name} (at least {smallest} px)"
            )
        check_range(name, "width", self.width, 0.0, 64.0, lo_open=True)
        if self.width != 1.0 and self.model_name not in CIFAR_NETS:
            nets = ", ".join(CIFAR_NETS)
            raise ConfigError(
                f"{name}.width={self.width!r} applies to the CIFAR-style models ({nets}), not {self.model_name!r}"
            )
        if self.p_ramp is not None and not 0 <= self.p_ramp[0] < self.p_ramp[1]:
            raise ConfigError(f"{name}.p_ramp={self.p_ramp!r} must be two epochs E1 < E2, E1 >= 0")
        check_range(name, "refresh_fraction", self.refresh_fraction, 0.0, 1.0, lo_open=True)
        if abs(self.refresh_parts * self.refresh_fraction - 1) > 1e-9:
            raise ConfigError(f"{name}.refresh_fraction={self.refresh_fraction!r} must be 1/N for a whole N (0.25)")
        if self.refresh_fraction < 1 and self.refresh != "pass":
            raise ConfigError(
                f"{name}.refresh_fraction applies to refresh 'pass', not {self.refresh!r} (add --refresh pass)"
            )
        if self.refresh_size is not None:
            if self.refresh != "pass":
                raise ConfigError(
                    f"{name}.refresh_size applies to refresh 'pass', not {self.refresh!r} (add --refresh pass)"
                )
            if self.refresh_size < smallest:
                size = self.refresh_size
                raise ConfigError(
                    f"{name}.refresh_size={size!r} is too small for {self.model_name} (at least {smallest} px)"
                )
        if self.checkpoint_minutes is not None:
            check_range(name, "checkpoint_minutes", self.checkpoint_minutes, 0.0, 1e6, lo_open=True)
        check_range(name, "diversity_loss", self.diversity_loss, 0.0, 100.0)
        if self.diversity_loss > 0 and self.ensemble < 2:
            raise ConfigError(f"{name}.diversity_loss={self.diversity_loss!r} needs --ensemble >= 2 (a member's peers)")
        check_range(name, "lr", self.lr, 0.0, 100.0, lo_open=True)
        check_range(name, "momentum", self.momentum, 0.0, 1.0)
        check_range(name, "weight_decay", self.weight_decay, 0.0, 1.0)
        check_range(name, "label_smoothing", self.label_smoothing, 0.0, 1.0)
        check_range(name, "lr_decay", self.lr_decay, 0.0, 1.0, lo_open=True)
        if self.spec.needs_data and self.data is None:
            raise ConfigError(f"dataset {self.dataset!r} needs --data PATH")

    # -- derived values ------------------------------------------------------------------------------

    def steps_per_record(self, steps_per_epoch: int) -> int:
        """Optimiser steps between two step records."""
        return self.log_every or max(1, min(50, steps_per_epoch // 20))

    @property
    def refresh_parts(self) -> int:
        """How many refreshes cover every sample once (1 / refresh_fraction)."""
        return max(1, round(1 / self.refresh_fraction))

    @property
    def peer_rule(self) -> str:
        return self.peers or ("self" if self.ensemble == 1 else "others")

    @property
    def spec(self):
        """The dataset's record (gutout.pipelines.datasets.DATASETS)."""
        return DATASETS[self.dataset]

    @property
    def model_name(self) -> str:
        return self.model if self.model is not None else self.spec.default_model

    def p_at(self, epoch: int) -> float:
        """The cut probability of `epoch`: `p`, or its share of the linear ramp."""
        if self.p_ramp is None:
            return self.p
        start, end = self.p_ramp
        return self.p * min(max((epoch - start) / (end - start), 0.0), 1.0)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.dataset}-k{self.ensemble}-{self.policy}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.run_name

    def eval_batch_for(self, device_type: str) -> int:
        """The batch size of evaluation and refresh on a device of `device_type` ("cpu", "cuda")."""
        return self.eval_batch_size or EVAL_BATCH_SIZE.get(device_type, EVAL_BATCH_SIZE["cuda"])

    def cut_config(self) -> CutConfig:
        """The cut's options of this run, as the library's config."""
        return CutConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CutConfig)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Options that may differ between a run and its resumption: where it lives (the run directory is found by
    # out/name already, so a default-named run resumed by its directory name is the same run), where it logs,
    # how it shows progress, how often it checkpoints, and how often it scores the per-epoch split (scoring draws
    # no randomness: the training and the last epoch's record are the same, tests/test_trainer.py).
    RESUME_FREE = (
        *("resume", "wandb", "progress", "device", "num_threads", "out", "name"),
        *("checkpoint_every", "checkpoint_minutes", "eval_every"),
    )

    # How the saliency maps are refreshed: a run whose policy reads no maps (none, cutout, erasing) is the same run
    # under any of these, so a baseline recorded under another refresh default still resumes and still counts.
    MAP_REFRESH = ("refresh", "refresh_every", "refresh_fraction", "refresh_size")

    def identity(self) -> dict[str, Any]:
        """What must match for `--resume` to continue a run."""
        free = self.RESUME_FREE if self.needs_maps else (*self.RESUME_FREE, *self.MAP_REFRESH)
        return {k: v for k, v in self.to_dict().items() if k not in free}


def identity_differences(theirs: dict[str, Any], mine: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, theirs, mine) for every key of `mine`, this run's `identity()`, where a recorded run (`theirs`: its
    `identity()`, or the whole configuration an older checkpoint stored) differs, in key order. A key the recorded
    run lacks (an option newer than it) counts as that option's default; one `mine` leaves out (an option this
    configuration does not depend on, TrainConfig.MAP_REFRESH for a policy that reads no maps) is not compared."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    pairs = [(k, theirs.get(k, defaults.get(k)), mine[k]) for k in sorted(mine)]
    return [(k, a, b) for k, a, b in pairs if a != b]


# Options renamed since runs were recorded, old name -> new name (same meaning), so that `gutout show`, `compare`
# and `--resume` still read older run directories. Only run directories are translated: a user's options and
# config files with an old name fail like any unknown key.
RENAMED_OPTIONS = {"warmup_epochs": "cut_start"}


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The configuration a run directory's config.yaml records (OSError / yaml.YAMLError when it has none)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    recorded = yaml.safe_load(path.read_text()) or {}
    for old, new in RENAMED_OPTIONS.items():
        if old in recorded:
            if new in recorded:
                raise ConfigError(f"{path} records both {old!r} and its new name {new!r}")
            recorded[new] = recorded.pop(old)
    return make_config(recorded)


def _normalise(values: dict[str, Any], source: str = "the options") -> dict[str, Any]:
    """Option names with dashes as with underscores (`batch-size` is `batch_size`); both spellings at once fail."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in out:
            raise ConfigError(f"{source} set {name!r} twice, as {spelled[name]!r} and {key!r}; keep one")
        out[name], spelled[name] = value, key
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or TOML file (a flat mapping of option names)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as err:  # noqa: BLE001 - either parser's error, with the file named
        raise ConfigError(f"cannot parse {path}: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values, got {type(values).__name__}")
    return values


def make_config(file_values: dict[str, Any] | None = None, **cli_values: Any) -> TrainConfig:
    """File values, then the preset, then explicit CLI values (highest priority); unknown keys fail."""
    values = _normalise(dict(file_values or {}), "the config file")
    values.update(_normalise({k: v for k, v in cli_values.items() if v is not None}))
    preset = values.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        values = _normalise(dict(PRESETS[preset])) | values
    return from_mapping(TrainConfig, values)
