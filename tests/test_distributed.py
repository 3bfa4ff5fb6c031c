"""Multi-process training with torch.distributed (gloo on this CPU machine), launched through torchrun."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gutout import SaliencyCache
from gutout.config import ConfigError
from gutout.train.distributed import plan_layout
from gutout.train.rundir import RunDirectoryBusy, RunDirectoryLock
from gutout.train.tracking import read_metrics
from tests.conftest import fake_fashion_mnist


def test_member_placement():
    # W = K: a member per rank.
    assert [plan_layout(4, 4, r).members for r in range(4)] == [(0,), (1,), (2,), (3,)]
    # W = 2K: a DDP group of two ranks per member, each rank one shard.
    layouts = [plan_layout(2, 4, r) for r in range(4)]
    assert [(lay.members, lay.shard_id, lay.group_size) for lay in layouts] == [
        ((0,), 0, 2),
        ((0,), 1, 2),
        ((1,), 0, 2),
        ((1,), 1, 2),
    ]
    assert layouts[2].group_ranks(1) == [2, 3] and layouts[1].group_leader is False
    # W < K: several members per rank.
    assert [plan_layout(5, 2, r).members for r in range(2)] == [(0, 2, 4), (1, 3)]
    with pytest.raises(ConfigError, match="cannot place 2 ensemble members on 3 processes"):
        plan_layout(2, 3, 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_fashion_mnist(tmp_path_factory.mktemp("fmnist-dist"), n_train=512)


def gutout(*args, timeout=600, env=None):
    cmd = [sys.executable, "-m", "gutout", "train", "fashion-mnist", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def common(data, out, *extra):
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--wandb",
        "disabled",
        "--no-progress",
        "--batch-size",
        "32",
        "--num-threads",
        "0",
        *extra,
    ]


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)[0]


@pytest.mark.slow
@pytest.mark.parametrize("refresh", ["harvest", "pass"])
def test_two_processes_train_both_members_and_build_the_same_cache_as_one(data, tmp_path, refresh):
    args = common(data, tmp_path, "--ensemble", "2", "--subset", "256", "--epochs", "2", "--refresh", refresh)
    two = gutout(*args, "--nproc", "2", "--name", "two")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "| member 0 |" in two.stdout and "| member 1 |" in two.stdout
    records = metrics(tmp_path / "two")
    record = records[-1]
    # 256 samples x 2 members x 7 x 7 float16 maps + ids: every rank receives the whole cache once per refresh; a
    # pass has none after the last epoch, harvest gathers that epoch's maps too (for the checkpoint).
    whole = 256 * 2 * 49 * 2
    assert records[0]["dist/cache_bytes_received"] >= whole
    assert (
        (record["dist/cache_bytes_received"] >= whole)
        if refresh == "harvest"
        else (record["dist/cache_bytes_received"] == 0)
    )
    # One process with the two members, one thread like each torchrun worker (OMP_NUM_THREADS=1): each member
    # sees the same seeds, data and arithmetic either way, so the caches and metrics must be identical.
    one = gutout(*args, "--name", "one", env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr[-3000:]
    a = SaliencyCache.load(tmp_path / "one" / "cache.gsc")
    b = SaliencyCache.load(tmp_path / "two" / "cache.gsc")
    assert bool(a.valid.all()) and torch.equal(a.valid, b.valid) and torch.equal(a.maps, b.maps)
    assert untimed(metrics(tmp_path / "one")[-1]) == untimed(record)


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "throughput/", "dist/"))}


def assert_complete(run: Path, members: int, epochs: int) -> None:
    """Every epoch logged; the last epoch's test metrics are what one process computes from the saved members (so
    every rank's evaluation shard was gathered, and each member's checkpoint holds the weights that were scored);
    and every member has a published map for every sample."""
    import dataclasses

    from gutout.train.config import read_run_config
    from gutout.train.trainer import Trainer

    records = metrics(run)
    assert [r["epoch"] for r in records] == list(range(epochs))
    cfg = dataclasses.replace(read_run_config(run), out=str(run.parent), name=run.name, resume=True)
    trainer = Trainer(cfg, log=lambda *a: None)
    assert trainer.load_checkpoint() and trainer.start_epoch == epochs
    again, _ = trainer.evaluate("test")
    for m in range(members):
        assert again[f"test/member/{m}/acc"] == records[-1][f"test/member/{m}/acc"], m
        assert again[f"test/member/{m}/nll"] == pytest.approx(records[-1][f"test/member/{m}/nll"], abs=1e-5)
    assert again["test/ensemble/acc"] == records[-1]["test/ensemble/acc"]
    cache = SaliencyCache.load(run / "cache.gsc")
    assert cache.members == members and bool(cache.valid.all()), cache.valid.float().mean(1)  # every rank's shard


@pytest.mark.slow
def test_ddp_groups_and_several_members_per_rank(data, tmp_path):
    ddp = gutout(
        *common(data, tmp_path, "--ensemble", "2", "--subset", "256", "--epochs", "2", "--nproc", "4", "--name", "ddp")
    )
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert_complete(tmp_path / "ddp", members=2, epochs=2)
    packed = gutout(
        *common(
            data, tmp_path, "--ensemble", "3", "--subset", "256", "--epochs", "2", "--nproc", "2", "--name", "packed"
        )
    )
    assert packed.returncode == 0, packed.stdout[-3000:] + packed.stderr[-3000:]
    assert_complete(tmp_path / "packed", members=3, epochs=2)
    # Two ranks holding members (0, 2) and (1,) compute what one process holding all three does.
    one = gutout(
        *common(data, tmp_path, "--ensemble", "3", "--subset", "256", "--epochs", "2", "--name", "one"),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert untimed(metrics(tmp_path / "one")[-1]) == untimed(metrics(tmp_path / "packed")[-1])
    a, b = (SaliencyCache.load(tmp_path / name / "cache.gsc") for name in ("one", "packed"))
    assert torch.equal(a.maps, b.maps) and torch.equal(a.valid, b.valid)
    bad = gutout(*common(data, tmp_path, "--ensemble", "2", "--nproc", "3", "--name", "bad"))
    assert bad.returncode != 0 and "cannot place 2 ensemble members on 3 processes" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_the_diversity_loss_on_two_ranks_is_the_one_process_penalty(data, tmp_path):
    # Members (0, 2) on rank 0 and (1,) on rank 1: each member's penalty needs the maps of peers on the other rank,
    # so the inputs and maps cross processes every step; the run must be the one-process run, digit for digit.
    args = common(data, tmp_path, "--ensemble", "3", "--subset", "128", "--epochs", "1", "--policy", "none")
    args += ["--diversity-loss", "1.0"]
    two = gutout(*args, "--nproc", "2", "--name", "two")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = gutout(*args, "--name", "one", env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr[-3000:]
    plain = gutout(*args[:-2], "--name", "plain", env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    record = untimed(metrics(tmp_path / "two")[-1])
    assert untimed(metrics(tmp_path / "one")[-1]) == record
    assert untimed(metrics(tmp_path / "plain")[-1])["test/member/0/nll"] != record["test/member/0/nll"]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
def test_a_killed_rank_restarts_and_resumes(data, tmp_path):
    args = common(
        data,
        tmp_path,
        "--ensemble",
        "2",
        "--subset",
        "384",
        "--epochs",
        "3",
        "--nproc",
        "2",
        "--max-restarts",
        "1",
        "--name",
        "victim",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gutout", "train", "fashion-mnist", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = tmp_path / "victim"
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # rank 1 dies mid-run
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, "\n".join(line for line in output.splitlines() if not line.startswith("W1"))[-6000:]
    assert "resuming" in output
    straight = gutout(
        *common(
            data, tmp_path, "--ensemble", "2", "--subset", "384", "--epochs", "3", "--nproc", "2", "--name", "straight"
        )
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    # torchrun runs each worker with one thread, so the restarted run must reproduce the uninterrupted one exactly.
    assert [untimed(r) for r in metrics(run)] == [untimed(r) for r in metrics(tmp_path / "straight")]


@pytest.mark.slow
def test_harvest_on_two_ranks_checkpoints_every_ranks_maps(data, tmp_path):
    # One member trained by a DDP group of two ranks, each harvesting its shard; a refresh only every second
    # epoch, so the last two epochs' maps stay unpublished: the checkpoint (rank 0's) must still hold both shards'.
    args = common(
        data,
        tmp_path,
        "--subset",
        "256",
        "--epochs",
        "3",
        "--refresh",
        "harvest",
        "--refresh-every",
        "2",
        "--nproc",
        "2",
        "--name",
        "harvest",
    )
    run = gutout(*args)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cache = torch.load(tmp_path / "harvest" / "checkpoint.pt", weights_only=False)["cache"]
    rewritten = (cache["pending_maps"] != cache["maps"]).flatten(2).any(-1)  # (K, N): harvested after the publish
    assert float(rewritten.float().mean()) > 0.99, float(rewritten.float().mean())


@pytest.fixture(scope="module")
def two_rank_straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-rank")
    args = common(data, out, "--ensemble", "2", "--subset", "384", "--epochs", "3", "--nproc", "2", "--log-every", "4")
    result = gutout(*args, "--refresh", "harvest", "--name", "straight")
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out / "straight")


def without_timing(records: list[dict]) -> list[dict]:
    timing = ("time/", "throughput/", "dist/", "step/img_per_s", "step/loader_wait_frac", "step/ms")
    return [{k: v for k, v in r.items() if not k.startswith(timing)} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_the_launcher_stops_both_ranks_at_one_step_and_resumes_exactly(
    data, tmp_path, two_rank_straight, signum
):
    from gutout.train.trainer import PREEMPTED_EXIT

    args = common(data, tmp_path, "--ensemble", "2", "--subset", "384", "--epochs", "3", "--nproc", "2")
    args += ["--log-every", "4", "--refresh", "harvest", "--name", "stopped"]
    cmd = [sys.executable, "-m", "gutout", "train", "fashion-mnist", *args]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = tmp_path / "stopped"
    deadline = time.time() + 300
    while len(read_metrics(run)[1] if (run / "metrics.jsonl").exists() else []) < 4:  # inside epoch 1
        assert launcher.poll() is None and time.time() < deadline, "the run ended before the signal could land"
        time.sleep(0.02)
    launcher.send_signal(signum)  # as SLURM or Kubernetes signals the job's main process: torchrun's agent
    _, stderr = launcher.communicate(timeout=300)
    message = stderr.decode()
    assert launcher.returncode == PREEMPTED_EXIT, message[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in message
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and 0 < state["step"] < 12, (state["epoch"], state["step"])  # both ranks, one step
    assert all((run / f"member-{m}.epoch-1.step-{state['step']}.pt").exists() for m in (0, 1))
    i = args.index("--nproc")
    refused = gutout(*args[:i], *args[i + 2 :], "--resume")  # mid-epoch, the epoch's sums and data are per process
    assert refused.returncode != 0 and "it resumes on 2 (--nproc 2), not 1" in refused.stderr, refused.stderr[-2000:]
    resumed = gutout(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Harvested maps: the same records need the maps both ranks harvested before the stop.
    epochs, steps = read_metrics(run)
    assert without_timing(epochs) == without_timing(two_rank_straight[0])
    assert without_timing(steps) == without_timing(two_rank_straight[1]) != []


def kill_two_ranks_after_the_first_checkpoint(args: list[str], run: Path) -> None:
    """Train `args` on 2 ranks until `run` holds its first checkpoint (epoch 0's end), then SIGKILL the launcher and
    both workers at once, as when the node goes away."""
    cmd = [sys.executable, "-m", "gutout", "train", "fashion-mnist", *args, "--nproc", "2"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists():
        assert launcher.poll() is None and time.time() < deadline, "the run ended before the kill could land"
        time.sleep(0.02)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    # The workers are not the launcher: rank 0 holds the run's lock until its own exit closes the file, a moment
    # after the launcher is reaped. Wait for that, as a user restarting a node would find it.
    while True:
        try:
            RunDirectoryLock(run).acquire().release()
            return
        except RunDirectoryBusy:
            assert time.time() < deadline, "the killed ranks still hold the run's lock"
            time.sleep(0.02)


@pytest.mark.slow
def test_an_epoch_end_checkpoint_of_two_ranks_resumes_in_one_process(data, tmp_path, two_rank_straight):
    # One member per rank (W = K): no rank shards the data, so one process with both members continues exactly.
    args = common(data, tmp_path, "--ensemble", "2", "--subset", "384", "--epochs", "3", "--log-every", "4")
    args += ["--refresh", "harvest", "--name", "moved"]
    run = tmp_path / "moved"
    kill_two_ranks_after_the_first_checkpoint(args, run)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] is None
    resumed = gutout(*args, "--resume", env=dict(os.environ, OMP_NUM_THREADS="1"))  # one thread, as each worker
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs, steps = read_metrics(run)
    assert without_timing(epochs) == without_timing(two_rank_straight[0])
    assert without_timing(steps) == without_timing(two_rank_straight[1])
    cache = SaliencyCache.load(run / "cache.gsc")
    assert cache.members == 2 and bool(cache.valid.all())


@pytest.mark.slow
def test_a_sharded_members_epoch_end_checkpoint_resumes_in_one_process(data, tmp_path):
    # K = 1 on 2 ranks: one DDP group, each rank half of each epoch. One process then reads every sample itself:
    # not the same numbers as an uninterrupted 2-rank run, but a complete run with a complete cache.
    args = common(data, tmp_path, "--ensemble", "1", "--subset", "256", "--epochs", "2", "--name", "resharded")
    run = tmp_path / "resharded"
    kill_two_ranks_after_the_first_checkpoint(args, run)
    resumed = gutout(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert [r["epoch"] for r in metrics(run)] == [0, 1]
    cache = SaliencyCache.load(run / "cache.gsc")
    assert cache.members == 1 and bool(cache.valid.all())
