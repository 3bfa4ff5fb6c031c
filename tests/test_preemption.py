"""Preemption: SIGTERM (or SIGUSR1) stops a run after the current step with a checkpoint there and exit status 75;
--checkpoint-every writes the same mid-epoch checkpoint periodically; either resumes to exactly the metrics and the
step log of an uninterrupted run. Real processes, real signals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gutout.train.checkpoint import _position, member_path
from gutout.train.tracking import read_metrics
from gutout.train.trainer import PREEMPTED_EXIT
from tests.conftest import fake_fashion_mnist

TIMING = ("time/", "throughput/", "step/img_per_s", "step/loader_wait_frac", "step/ms")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=384, n_test=64)


def command(data, out, name, *extra):
    # 384 samples, batch 32: 12 steps per epoch; a step record every 4 steps.
    options = "--ensemble 2 --epochs 3 --batch-size 32 --eval-batch-size 256 --num-threads 0 --no-progress"
    options += " --wandb disabled --sample-grid 0 --log-every 4 --device cpu"
    args = ["train", "fashion-mnist", "--data", str(data), "--out", str(out), "--name", name, *options.split()]
    return [sys.executable, "-m", "gutout.train.cli", *args, *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def untimed(run_dir: Path) -> tuple[list[dict], list[dict]]:
    epochs, steps = read_metrics(run_dir)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(TIMING)}  # noqa: E731
    return [strip(r) for r in epochs], [strip(r) for r in steps]


def images_counted(run_dir: Path) -> tuple[list[int], list[int]]:
    """Images forwarded in each epoch and in each step record, recovered from the logged rates and times."""
    epochs, steps = read_metrics(run_dir)
    per_epoch = [round(r["throughput/train_img_per_s"] * r["time/train_s"]) for r in epochs if "time/train_s" in r]
    per_record = [round(r["step/img_per_s"] * r["step/ms"] * 4 / 1e3) for r in steps]  # 4 steps per record
    return per_epoch, per_record


# Two members, 12 steps of 32 images per epoch: 768 images per epoch, 256 per record of 4 steps.
COUNTED = ([768] * 3, [256] * 9)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    subprocess.run(command(data, out, "straight"), check=True, env=ENV, capture_output=True, timeout=900)
    return untimed(out / "straight")


def wait_for(condition, process, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the signal could land"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"global_step"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_mid_epoch_checkpoints_exits_75_and_resumes_exactly(data, tmp_path, straight, signum):
    run = tmp_path / "stopped"
    process = subprocess.Popen(
        command(data, tmp_path, "stopped"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for(lambda: steps_logged(run) >= 4, process)  # inside epoch 1: three records of epoch 0, one of epoch 1
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=600)  # stdout is the terminal's (the epoch lines)
    assert process.returncode == PREEMPTED_EXIT, stderr.decode()[-2000:]
    message = stderr.decode()
    assert f"stopped by {signal.Signals(signum).name}" in message and "continue with --resume" in message
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and 0 < state["step"] < 12, (state["epoch"], state["step"])  # mid-epoch
    previous = torch.load(run / "checkpoint.previous.pt", weights_only=False)
    assert (previous["epoch"], previous["step"]) == (0, None)  # the last two complete checkpoints are kept...
    assert sorted(p.name for p in run.glob("member-*.pt")) == sorted(
        [f"member-{m}.epoch-1.step-{state['step']}.pt" for m in (0, 1)] + [f"member-{m}.epoch-0.pt" for m in (0, 1)]
    )  # ...with their member files, and no others
    resumed = subprocess.run(command(data, tmp_path, "stopped", "--resume"), env=ENV, capture_output=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert untimed(run) == straight
    assert images_counted(run) == COUNTED  # the counts stopped mid-epoch carry over


@pytest.mark.slow
def test_sigkill_after_a_periodic_checkpoint_resumes_exactly(data, tmp_path, straight):
    run = tmp_path / "killed"
    process = subprocess.Popen(
        command(data, tmp_path, "killed", "--checkpoint-every", "5"), env=ENV, stdout=subprocess.DEVNULL
    )
    wait_for(lambda: (run / "member-1.epoch-1.step-5.pt").exists(), process)
    time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(command(data, tmp_path, "killed", "--resume"), env=ENV, capture_output=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert untimed(run) == straight
    assert images_counted(run) == COUNTED  # the counts stopped mid-epoch carry over


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_sigterm_mid_epoch_resumes_exactly_on_the_torch_and_dali_backends(data, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    options = ("--backend", backend, "--refresh", "pass")  # the maps of a refresh pass (the other tests harvest)
    straight = subprocess.run(command(data, tmp_path, "straight", *options), env=ENV, capture_output=True)
    assert straight.returncode == 0, straight.stderr.decode()[-2000:]
    run = tmp_path / "stopped"
    process = subprocess.Popen(command(data, tmp_path, "stopped", *options), env=ENV, stdout=subprocess.DEVNULL)
    wait_for(lambda: steps_logged(run) >= 4, process)  # inside epoch 1
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=600)
    assert process.returncode == PREEMPTED_EXIT
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] is not None  # stopped mid-epoch
    resumed = subprocess.run(command(data, tmp_path, "stopped", *options, "--resume"), env=ENV, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert untimed(run) == untimed(tmp_path / "straight")


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["common", "member"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumes_exactly(data, tmp_path, straight, damaged):
    run = tmp_path / "damaged"
    process = subprocess.Popen(
        command(data, tmp_path, "damaged", "--checkpoint-every", "5"), env=ENV, stdout=subprocess.DEVNULL
    )
    wait_for(lambda: (run / "member-1.epoch-1.step-5.pt").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    latest = torch.load(run / "checkpoint.pt", weights_only=False)
    assert (run / "checkpoint.previous.pt").exists()
    target = run / "checkpoint.pt" if damaged == "common" else member_path(run, 1, latest["epoch"], latest["step"])
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # a truncated copy
    resumed = subprocess.run(command(data, tmp_path, "damaged", "--resume"), env=ENV, capture_output=True, timeout=900)
    output = resumed.stdout.decode() + resumed.stderr.decode()
    assert resumed.returncode == 0, output[-2000:]
    assert f"cannot read checkpoint {target}" in output and "resuming from the previous complete checkpoint" in output
    assert untimed(run) == straight


def test_member_files_sort_by_position():
    names = ["member-0.epoch-2.pt", "member-0.epoch-2.step-7.pt", "member-0.epoch-10.step-1.pt", "member-0.epoch-1.pt"]
    ordered = sorted(names, key=lambda n: _position(Path(n)))
    assert ordered == [
        "member-0.epoch-1.pt",
        "member-0.epoch-2.step-7.pt",
        "member-0.epoch-2.pt",
        "member-0.epoch-10.step-1.pt",
    ]


@pytest.mark.slow
def test_compare_stopped_by_sigterm_says_so_and_the_same_command_resumes(data, tmp_path):
    options = "--runs none,cutout --seeds 1 --epochs 2 --subset 256 --val-split 64 --batch-size 32 --no-progress"
    args = ["compare", "fashion-mnist", "--data", str(data), "--out", str(tmp_path), *options.split()]
    cmd = [sys.executable, "-m", "gutout.train.cli", *args]
    process = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: steps_logged(tmp_path / "fashion-mnist-none-k1-s0") >= 3, process)  # inside the first run
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    message = stderr.decode()
    assert process.returncode == PREEMPTED_EXIT, message[-2000:]
    assert "stopped by SIGTERM" in message and "the same command resumes" in message and "Traceback" not in message
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "fashion-mnist-none-k1-s0 (resuming)" in again.stdout and "| cutout | 1 | 0 | reference |" in again.stdout
