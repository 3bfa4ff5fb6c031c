"""A run directory belongs to one process, and every bad input ends in one line that names it, with nothing lost.

Faults about processes, signals and files drive the real CLI in a subprocess; faults in the loader's input drive
the Python API.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from gutout import SaliencyCache
from gutout.pipelines import DatasetError, GutoutLoader
from gutout.train.config import TrainConfig
from gutout.train.models import small_resnet
from gutout.train.rundir import RunDirectoryBusy, RunDirectoryLock
from gutout.train.tracking import read_metrics
from gutout.train.trainer import Trainer
from tests.conftest import fake_fashion_mnist


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=512, n_test=64)


def train_args(data, out, *extra):
    return [
        "train",
        "fashion-mnist",
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "32",
        "--eval-batch-size",
        "64",
        "--num-threads",
        "0",
        "--no-progress",
        "--wandb",
        "disabled",
        *extra,
    ]


def gutout(*args, timeout=300, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "gutout", *args], capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )


def one_line_error(result) -> str:
    """The CLI's error: exit status 1 and a single `Error: ...` line, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared"
        assert time.time() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.05)


# -- 1. one process per run directory ----------------------------------------------------------------------------


def test_a_second_run_into_a_busy_directory_is_refused_and_nothing_is_lost(data, tmp_path):
    first = train_args(data, tmp_path, "--name", "same", "--epochs", "50", "--subset", "256")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    a = subprocess.Popen(
        [sys.executable, "-m", "gutout", *first], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    run = tmp_path / "same"
    try:
        wait_for(run / "config.yaml", a)  # the run has started; no checkpoint exists yet
        assert not (run / "checkpoint.pt").exists()
        config_before = (run / "config.yaml").read_text()
        for extra in (["--policy", "area"], ["--resume"]):  # another configuration, or a resume of this one
            b = gutout(*train_args(data, tmp_path, "--name", "same", "--epochs", "1", *extra))
            message = one_line_error(b)
            assert f"{run} is in use by another run (process {a.pid})" in message, message
        assert a.poll() is None, "the first run goes on"
        assert (run / "config.yaml").read_text() == config_before
    finally:
        a.kill()
        a.wait()
    # SIGKILL leaves no stale lock (what refuses now is the identity check, which holds from the run's first
    # moment), and the directory still holds the first run, untouched.
    fresh = gutout(*train_args(data, tmp_path, "--name", "same", "--epochs", "1", "--policy", "area"))
    assert "already holds a run; pass --resume" in one_line_error(fresh)
    other = gutout(*train_args(data, tmp_path, "--name", "same", "--epochs", "1", "--policy", "area", "--resume"))
    message = one_line_error(other)  # refused by the identity check (of config.yaml, or of a checkpoint by now)
    assert "refusing to resume" in message and "epochs:" in message and "50" in message, message
    assert (run / "config.yaml").read_text() == config_before
    with RunDirectoryLock(run) as lock:
        assert lock.held and (run / "lock").read_text().strip() == str(os.getpid())
    records = read_metrics(run)[0]
    assert [r["epoch"] for r in records] == list(range(len(records)))  # only the first run's epochs


def test_the_lock_is_released_after_a_run_and_refused_while_held(data, tmp_path):
    run = tmp_path / "r"
    with RunDirectoryLock(run):
        with pytest.raises(RunDirectoryBusy, match=f"process {os.getpid()}"):
            RunDirectoryLock(run).acquire()
        result = gutout(*train_args(data, tmp_path, "--name", "r", "--epochs", "1"))
        assert f"{run} is in use by another run (process {os.getpid()})" in one_line_error(result)
        assert not (run / "config.yaml").exists()  # refused before writing anything
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path),
        name="r",
        epochs=1,
        batch_size=32,
        wandb="disabled",
        num_threads=0,
        subset=64,
        sample_grid=0,
    )
    Trainer(cfg, log=lambda *a: None).run()  # a finished run lets go of its directory
    RunDirectoryLock(run).acquire().release()


# -- 2-4, 7: inputs checked where they enter --------------------------------------------------------------------


def test_from_arrays_refuses_labels_that_are_not_classes():
    images = torch.zeros(4, 8, 8, dtype=torch.uint8)
    classes = ["a", "b", "c"]
    for labels, message in [
        (torch.tensor([0.0, 1.9, 2.0, 1.0]), "label 1 is 1.9"),
        (torch.tensor([0, 1, -1, -7]), r"label 2 is -1; labels must lie in \[0, 3\)"),
        (torch.tensor([0, 12, 1, 2]), r"label 1 is 12; labels must lie in \[0, 3\)"),
        (torch.tensor([0.0, float("nan"), 1.0, 2.0]), "label 1 is nan"),
    ]:
        with pytest.raises(DatasetError, match=message):
            GutoutLoader.from_arrays(images, labels, classes=classes, backend="tensor")
    with pytest.raises(DatasetError, match="label 3 is -2; labels must lie in 0 or more"):
        GutoutLoader.from_arrays(images, torch.tensor([0, 1, 2, -2]), backend="tensor")  # classes from the labels
    loader = GutoutLoader.from_arrays(images, torch.tensor([0.0, 1.0, 2.0, 1.0]), classes=classes, backend="tensor")
    assert loader.dataset.labels.tolist() == [0, 1, 2, 1] and loader.dataset.labels.dtype == torch.int64
    with pytest.raises(DatasetError, match="the arrays hold no samples"):
        GutoutLoader.from_arrays(torch.zeros(0, 8, 8, dtype=torch.uint8), torch.zeros(0), backend="tensor")


@pytest.mark.parametrize(
    "extra, file_text, message",
    [
        (["--image-size", "0"], None, "image_size=0 is too small for small-resnet (at least 8 px)"),
        (["--model", "resnet18", "--image-size", "32"], None, "image_size=32 is too small for resnet18 (at least 64"),
        ([], "batch_size: 16\nbatch-size: 32\n", "set 'batch_size' twice, as 'batch_size' and 'batch-size'"),
        ([], 'lr: "fast"\n', "TrainConfig.lr='fast' must be a number"),
        ([], "milestones: [2, x]\n", "TrainConfig.milestones=(2, 'x') must be a list of integers"),
        ([], "amp: 3\n", "TrainConfig.amp=3 must be true/false"),
    ],
)
def test_bad_options_and_config_values_are_named_before_anything_is_written(data, tmp_path, extra, file_text, message):
    if file_text is not None:
        (tmp_path / "bad.yaml").write_text(file_text)
        extra = [*extra, "--config", str(tmp_path / "bad.yaml")]
    result = gutout(*train_args(data, tmp_path / "runs", "--epochs", "1", "--name", "x", *extra))
    assert message in one_line_error(result)
    assert not (tmp_path / "runs").exists()


# -- 5, 6: image folders ------------------------------------------------------------------------------------------


def jpeg(path: Path, seed: int, size=(64, 64)) -> None:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")


def image_tree(root: Path, classes=("a", "b", "c"), per_class=4) -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                jpeg(root / split / name / f"{i}.jpg", 100 * c + i + (50 if split == "val" else 0))
    return root


def test_check_reports_every_problem_train_would_refuse(tmp_path):
    root = image_tree(tmp_path / "tree")
    ok = gutout("check", str(root))
    assert ok.returncode == 0 and "24 files, 0 bad, 0 structural problems" in ok.stdout, ok.stdout + ok.stderr
    for f in (root / "train" / "b").iterdir():
        f.unlink()  # an empty class folder
    for f in (root / "val" / "c").iterdir():
        f.unlink()
    (root / "val" / "c").rmdir()  # a class train/ has and val/ lacks
    (root / "train" / "a" / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    bad = gutout("check", str(root))
    assert bad.returncode == 1
    assert f"class folder {root / 'train' / 'b'} holds no images" in bad.stdout
    assert "missing from val: ['c']" in bad.stdout
    assert f"{root / 'train' / 'a' / '1.jpg'}: " in bad.stdout
    assert "16 files, 1 bad, 2 structural problems" in bad.stdout
    train = gutout(
        "train",
        "folder",
        "--data",
        str(root),
        "--out",
        str(tmp_path / "runs"),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--no-progress",
        "--wandb",
        "disabled",
        "--backend",
        "torch",
        "--model",
        "small-resnet",
    )
    assert "holds no images" in one_line_error(train)  # what check reported is what train refuses


def test_check_hash_tells_content_apart_where_the_fingerprint_cannot(tmp_path):
    root = image_tree(tmp_path / "tree", per_class=2)
    first = gutout("check", str(root), "--hash")
    path = root / "train" / "a" / "0.jpg"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # same name, same size, other content
    path.write_bytes(bytes(data))
    second = gutout("check", str(root), "--hash")
    digests = [
        next(line for line in r.stdout.splitlines() if line.startswith("content sha256")) for r in (first, second)
    ]
    assert digests[0] != digests[1]
    from gutout.pipelines import load_folder

    assert load_folder(root / "train").fingerprint == load_folder(root / "train").fingerprint  # names only


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_corrupt_image_stops_training_with_one_line_naming_it(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = image_tree(tmp_path / "tree")
    (root / "train" / "b" / "2.jpg").write_bytes(b"\xff\xd8 garbage, not a jpeg")
    args = [
        "train",
        "folder",
        "--data",
        str(root),
        "--out",
        str(tmp_path / "runs"),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--no-progress",
        "--wandb",
        "disabled",
        "--num-threads",
        "1",
        "--backend",
        backend,
        "--name",
        "x",
        "--model",
        "small-resnet",
    ]
    message = one_line_error(gutout(*args))
    assert str(root / "train" / "b" / "2.jpg") in message and "--skip-corrupt" in message, message
    assert "skip_corrupt=True" not in message
    skipped = gutout(*args, "--name", "y", "--skip-corrupt")
    assert skipped.returncode == 0, skipped.stderr[-3000:]


# -- 8: faults that used to end in tracebacks ----------------------------------------------------------------------


def test_a_damaged_member_checkpoint_is_named_on_resume(data, tmp_path):
    args = train_args(data, tmp_path, "--epochs", "1", "--subset", "64", "--name", "d")
    assert gutout(*args).returncode == 0
    member = tmp_path / "d" / "member-0.epoch-0.pt"
    member.write_bytes(b"not a checkpoint")
    message = one_line_error(gutout(*args, "--resume"))
    assert f"cannot read checkpoint {member}" in message, message


@contextlib.contextmanager
def small_filesystem(tmp_path: Path, options: str):
    """A tmpfs mounted with `options` (needs root and mount rights; skips where the machine has neither)."""
    where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_read_only_out_is_one_line(data, tmp_path):
    with small_filesystem(tmp_path, "ro,size=1m") as readonly:
        message = one_line_error(gutout(*train_args(data, readonly / "runs", "--epochs", "1", "--subset", "64")))
        assert f"cannot create the run directory {readonly / 'runs'}" in message
        assert "Read-only file system; choose a writable --out" in message, message


def test_a_full_disk_is_one_line_and_the_run_continues_once_there_is_room(data, tmp_path):
    with small_filesystem(tmp_path, "size=256k") as disk:  # room for config and metrics, not for a checkpoint
        args = train_args(data, disk, "--epochs", "2", "--subset", "64", "--name", "full")
        message = one_line_error(gutout(*args))
        assert "No space left on device; free some space, then continue with --resume" in message, message
        assert "no epoch of" in message and "was checkpointed yet" in message
        run = disk / "full"
        assert not list(run.glob(".*.tmp")), "no half-written file is left behind"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = gutout(*args, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [r["epoch"] for r in read_metrics(run)[0]] == [0, 1]


def test_refresh_with_a_head_too_small_for_the_classes_is_named():
    images = torch.randint(0, 255, (16, 28, 28), dtype=torch.uint8)
    cache = SaliencyCache(1, 16, (7, 7))
    loader = GutoutLoader.from_arrays(images, torch.arange(16) % 10, cache=cache, backend="tensor", policy="threshold")
    with pytest.raises(ValueError, match="asks for class 3, but the model gives 3 logits"):
        loader.refresh(small_resnet(3, 1))


# -- 9, 10: signals, and extending a run -----------------------------------------------------------------------------


def test_ctrl_c_exits_130_and_says_where_the_last_checkpoint_is(data, tmp_path):
    args = train_args(data, tmp_path, "--epochs", "50", "--subset", "256", "--name", "i")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gutout", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        # A shell without job control starts background jobs with SIGINT ignored, and the child would inherit
        # that (Python then installs no KeyboardInterrupt handler): give it the terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for(tmp_path / "i" / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted: the checkpoint of epoch" in err, err[-3000:]
    assert f"in {tmp_path / 'i'} is complete; continue with --resume" in err
    epoch = torch.load(tmp_path / "i" / "checkpoint.pt", weights_only=False)["epoch"]
    assert f"epoch {epoch} " in err


def test_more_epochs_need_a_new_run_initialised_from_the_old_one(data, tmp_path):
    args = train_args(data, tmp_path, "--epochs", "1", "--subset", "64", "--ensemble", "2", "--policy", "none")
    assert gutout(*args, "--name", "short").returncode == 0
    three_epochs = ("--epochs", "3", "--subset", "64", "--ensemble", "2", "--policy", "none")
    longer = one_line_error(gutout(*train_args(data, tmp_path, *three_epochs, "--name", "short", "--resume")))
    assert "epochs: checkpoint has 1, this run has 3" in longer
    assert f"--init-from {tmp_path / 'short'} --name <another name>" in longer
    extended = gutout(
        *train_args(data, tmp_path, *three_epochs, "--name", "long", "--init-from", str(tmp_path / "short"))
    )
    assert extended.returncode == 0 and f"initialised from {tmp_path / 'short'} (its epoch 0)" in extended.stdout
    cfg = TrainConfig(data=str(data), out=str(tmp_path), ensemble=2, subset=64, wandb="disabled", num_threads=0)
    trainer = Trainer(cfg, log=lambda *a: None)
    assert trainer.init_from(tmp_path / "short") == 0
    for m in range(2):
        saved = torch.load(tmp_path / "short" / f"member-{m}.epoch-0.pt", weights_only=False)["model"]
        assert all(torch.equal(v, trainer.members[m].net.state_dict()[k]) for k, v in saved.items())
    bigger = Trainer(
        TrainConfig(data=str(data), out=str(tmp_path), ensemble=3, subset=64, wandb="disabled"), log=lambda *a: None
    )
    with pytest.raises(ValueError, match="no weights for member 2"):
        bigger.init_from(tmp_path / "short")
    with pytest.raises(ValueError, match="no checkpoint.pt there"):
        trainer.init_from(tmp_path)
