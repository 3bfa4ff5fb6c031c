"""W&B never stops training: a failing init (online or offline) or a failing log leaves metrics.jsonl complete."""

import json
import warnings

import pytest

from gutout.train.config import TrainConfig
from gutout.train.tracking import read_metrics
from gutout.train.trainer import Trainer
from tests.conftest import fake_fashion_mnist, small_run

wandb = pytest.importorskip("wandb")


class FakeRun:
    def __init__(self, fail_log=False):
        self.logged, self.finished, self.fail_log = [], False, fail_log

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, payload):
        if self.fail_log:
            raise RuntimeError("wandb.log: the service went away")
        self.logged.append(payload)

    def finish(self):
        self.finished = True


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=128, n_test=32)


@pytest.fixture(autouse=True)
def clean_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the online fallback sets it for the process


def train(data, tmp_path, mode):
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path),
        epochs=2,
        batch_size=32,
        wandb=mode,
        num_threads=0,
        sample_grid=2,
        eval_batch_size=64,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, log=lambda *a: None).run()
    records, steps = read_metrics(cfg.run_dir)
    assert [r["epoch"] for r in records] == [0, 1], "metrics.jsonl holds every epoch"
    assert steps and steps[-1]["step/epoch"] == 2.0, "and every step record"
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_an_init_that_always_fails_leaves_the_metrics_log(data, tmp_path, monkeypatch, mode):
    calls = []

    def init(**kwargs):
        calls.append(kwargs["mode"])
        raise RuntimeError(f"wandb.init: no {kwargs['mode']} for you")

    monkeypatch.setattr(wandb, "init", init)
    messages = train(data, tmp_path, mode)
    assert calls == (["offline"] if mode == "offline" else ["online", "offline"])
    assert any("logging to metrics.jsonl only" in m for m in messages), messages


def test_a_failed_online_init_falls_back_to_offline(data, tmp_path, monkeypatch):
    run = FakeRun()

    def init(**kwargs):
        if kwargs["mode"] == "online":
            raise TimeoutError("wandb.init: no network")
        return run

    monkeypatch.setattr(wandb, "init", init)
    messages = train(data, tmp_path, "online")
    assert any("logging offline instead" in m for m in messages), messages
    assert [p["epoch"] for p in run.logged if "epoch" in p] == [0, 1] and run.finished
    assert any("global_step" in p for p in run.logged)  # step records reach W&B too


def test_a_failing_log_is_switched_off_and_training_goes_on(data, tmp_path, monkeypatch):
    run = FakeRun(fail_log=True)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    messages = train(data, tmp_path, "offline")
    assert sum("W&B logging failed" in m for m in messages) == 1, messages  # once, then W&B is off
    assert run.finished


def test_step_records_every_n_steps_between_the_epoch_records(data, tmp_path):
    cfg = small_run(data, tmp_path, ensemble=2, log_every=3)  # 128 samples, batch 32: 4 steps per epoch
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.run()
    lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = ["epoch" if "epoch" in r else r["global_step"] for r in lines]
    assert kinds == [3, 4, "epoch", 7, 8, "epoch"]  # every 3 steps, and at each epoch's last step
    steps = read_metrics(cfg.run_dir)[1]
    assert [r["step/epoch"] for r in steps] == pytest.approx([0.75, 1, 1.75, 2])
    for record in steps:
        assert 0 < record["step/loss/member/0"] < 10 and 0 < record["step/loss/member/1"] < 10
        assert record["step/img_per_s"] > 0 and 0 <= record["step/loader_wait_frac"] <= 1 and record["step/ms"] > 0
    assert steps[-1]["step/lr"] == trainer.members[0].scheduler.get_last_lr()[0]
    with pytest.raises(ValueError, match="log_every=0 must be an integer >= 1"):
        small_run(data, tmp_path, log_every=0)
