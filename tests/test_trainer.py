"""The trainer end to end: CLI, metrics, figures, W&B offline, harvest, exact resume after SIGKILL."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from gutout.config import ConfigError
from gutout.train.cli import main
from gutout.train.config import TrainConfig, make_config
from gutout.train.tracking import read_metrics as read_run_metrics
from gutout.train.trainer import NonFiniteLoss, Trainer, git_revision
from tests.conftest import fake_fashion_mnist

EPOCH_KEYS = [
    "epoch",
    "test/member/0/acc",
    "test/member/0/nll",
    "test/member/1/acc",
    "test/ensemble/acc",
    "test/ensemble/disagreement",
    "test/ensemble/nll",
    "test/ensemble/ece",
    "throughput/train_img_per_s",
    "throughput/loader_wait_frac",
    "time/refresh_s",
    "gutout/erased_frac",
    "time/epoch_s",
    "time/run_s",
]
TIMING = ("throughput/", "time/")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=1024)


def base_args(data, out, *extra):
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
        "256",
        "--num-threads",
        "0",
        "--no-progress",
        *extra,
    ]


def read_metrics(run_dir):
    return read_run_metrics(run_dir)[0]


def without_timing(record):
    return {k: v for k, v in record.items() if not k.startswith(TIMING)}


def test_tiny_ensemble_run_end_to_end(data, tmp_path):
    result = CliRunner().invoke(
        main,
        base_args(
            data, tmp_path, "--ensemble", "2", "--epochs", "3", "--name", "e2e", "--wandb", "offline", "--p", "0.5"
        ),
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "e2e"
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for record in records:
        assert all(key in record for key in EPOCH_KEYS), sorted(set(EPOCH_KEYS) - set(record))
    assert records[-1]["test/ensemble/acc"] > 0.5  # the synthetic classes are easy (chance: 0.1)
    assert all("time/harvest_ms_per_step" in r for r in records)  # the default refresh harvests
    cache = torch.load(run / "checkpoint.pt", weights_only=False)["cache"]
    assert bool(cache["valid"].all())  # every sample was seen, so every map was harvested
    assert 0 < records[-1]["gutout/erased_frac"] < 1
    for name in ("samples.png", "curves.png", "checkpoint.pt", "cache.gsc", "config.yaml", "git-revision"):
        assert (run / name).exists(), name
    assert list((run / "wandb").glob("offline-run-*")), "the W&B offline run lands in the run directory"
    revision = (run / "git-revision").read_text().strip()  # the code this process loaded, not a later HEAD
    assert revision == git_revision() and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", revision)
    assert "| ensemble |" in result.output and "disagreement" in result.output
    show = CliRunner().invoke(main, ["show", str(run)])
    assert show.exit_code == 0 and "samples.png" in show.output, show.output


def test_cli_rejects_bad_options_with_names(data, tmp_path):
    runner = CliRunner()
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("epochs: 2\nlearning_rate: 0.1\n")
    result = runner.invoke(main, base_args(data, tmp_path, "--config", str(bad_file)))
    assert result.exit_code != 0 and "learning_rate" in result.output
    result = runner.invoke(main, base_args(data, tmp_path, "--peers", "others"))
    assert result.exit_code != 0 and "--ensemble >= 2" in result.output
    result = runner.invoke(main, base_args(data, tmp_path, "--threshold", "1.5"))
    assert result.exit_code != 0 and "threshold=1.5" in result.output
    result = runner.invoke(main, base_args(data, tmp_path, "--policy", "blur"))
    assert result.exit_code != 0 and "blur" in result.output
    result = runner.invoke(main, base_args(tmp_path / "nowhere", tmp_path))
    assert result.exit_code != 0 and "nowhere" in result.output
    assert "--refresh-every" in runner.invoke(main, ["train", "--help"]).output


def test_config_file_and_preset(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('ensemble = 3\npolicy = "area"\narea = 0.3\n')
    from gutout.train.config import read_config_file

    cfg = make_config(read_config_file(toml), epochs=5)
    assert (cfg.ensemble, cfg.policy, cfg.area, cfg.epochs, cfg.peer_rule) == (3, "area", 0.3, 5, "others")
    paper = make_config(preset="cutout-paper", dataset="fashion-mnist")
    assert (paper.epochs, paper.milestones, paper.batch_size, paper.policy) == (200, (60, 120, 160), 128, "cutout")
    assert make_config(preset="cutout-paper", epochs=30).epochs == 30  # explicit options win


def test_pass_mode_reports_its_cost(data, tmp_path):
    result = CliRunner().invoke(
        main,
        base_args(
            data,
            tmp_path,
            "--ensemble",
            "2",
            "--epochs",
            "2",
            "--refresh",
            "pass",
            "--wandb",
            "disabled",
            "--name",
            "pass",
        ),
    )
    assert result.exit_code == 0, result.output
    records = read_metrics(tmp_path / "pass")
    assert not any("time/harvest_ms_per_step" in r for r in records)
    assert records[0]["time/refresh_s"] > 0 and records[-1]["time/refresh_s"] == 0  # none after the last epoch
    trainer_cache = torch.load(tmp_path / "pass" / "checkpoint.pt", weights_only=False)["cache"]
    assert bool(trainer_cache["valid"].all())  # the pass after epoch 0 mapped every sample


def test_resume_refuses_another_runs_checkpoint(data, tmp_path):
    runner = CliRunner()
    assert (
        runner.invoke(main, base_args(data, tmp_path, "--epochs", "1", "--name", "r", "--wandb", "disabled")).exit_code
        == 0
    )
    result = runner.invoke(
        main,
        base_args(
            data, tmp_path, "--epochs", "1", "--name", "r", "--wandb", "disabled", "--policy", "area", "--resume"
        ),
    )
    assert result.exit_code != 0 and "policy: checkpoint has 'threshold', this run has 'area'" in result.output
    result = runner.invoke(main, base_args(data, tmp_path, "--epochs", "1", "--name", "r", "--wandb", "disabled"))
    assert result.exit_code != 0 and "--resume" in result.output
    assert "policy: threshold" in (tmp_path / "r" / "config.yaml").read_text()  # the refusal changed nothing


def test_default_named_run_resumes_shows_and_checks_its_samples(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=64)
    args = [
        "train",
        "fashion-mnist",
        "--data",
        str(data),
        "--out",
        str(tmp_path),
        "--batch-size",
        "32",
        "--num-threads",
        "0",
        "--no-progress",
        "--wandb",
        "disabled",
        "--epochs",
        "1",
    ]
    runner = CliRunner()
    assert runner.invoke(main, args).exit_code == 0
    run = tmp_path / "fashion-mnist-k1-threshold-s0"
    show = runner.invoke(main, ["show", str(run)])  # found by its directory name, saved with name None
    assert show.exit_code == 0 and "samples.png" in show.output, show.output
    fake_fashion_mnist(data, n_train=256, n_test=64, seed=1)  # same path and count, other samples
    again = runner.invoke(main, [*args, "--resume"])
    assert again.exit_code != 0 and "fingerprint: snapshot has" in again.output, again.output
    assert "refusing to resume with maps of other samples" in again.output
    fresh = runner.invoke(main, [*args, "--name", "typo", "--resume"])
    assert fresh.exit_code == 0 and "holds no checkpoint yet; starting the run from epoch 0" in fresh.output
    assert "not a gutout run directory" in runner.invoke(main, ["show", str(tmp_path)]).output


def test_harvest_targets_the_prediction_with_target_pred(data, tmp_path):
    from gutout import cam_from_activations, warp_to_canonical

    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path),
        epochs=1,
        batch_size=32,
        wandb="disabled",
        num_threads=0,
        ensemble=2,
        refresh="harvest",
        target="pred",
        subset=64,
    )
    trainer = Trainer(cfg, log=lambda *a: None)
    member = trainer.members[0]
    batch = next(iter(member.loader.batches()))
    activations = torch.rand(len(batch.labels), member.net.fc.in_features, *trainer.map_size)
    logits = torch.zeros(len(batch.labels), 10)
    logits[:, 3] = 1.0  # predicts class 3 everywhere; the labels vary
    trainer._harvest(member, activations, logits, batch)
    harvested = trainer.cache._pending_maps[0, batch.indices].float()

    def harvest_of(targets):
        cams = cam_from_activations(activations, member.net.fc.weight, targets)
        maps, covered = warp_to_canonical(cams, batch.windows, batch.flips, trainer.map_size)
        return torch.where(covered, maps, torch.zeros_like(maps))

    assert torch.allclose(harvested, harvest_of(torch.full_like(batch.labels, 3)), atol=2e-3)  # float16 storage
    assert not torch.allclose(harvested, harvest_of(batch.labels), atol=2e-3)


def test_default_multistep_milestones_on_short_runs():
    from types import SimpleNamespace

    from gutout.train.members import lr_schedule

    def factors(epochs):
        cfg = SimpleNamespace(milestones=(), epochs=epochs, schedule="multistep", lr_decay=0.2)
        factor = lr_schedule(cfg, total_steps=epochs * 10, steps_per_epoch=10)
        return [round(factor(10 * e + 9), 6) for e in range(epochs)]  # each epoch's last step, after warm-up

    assert factors(1) == [1.0]  # never decays at epoch 0
    assert factors(3) == [1.0, 1.0, 0.2]  # one decay, not two at once
    assert factors(4) == [1.0, 1.0, 0.2, 0.04]
    assert factors(10) == [1.0] * 5 + [0.2] * 3 + [0.04] * 2


def test_folder_splits_must_hold_the_same_classes(tmp_path):
    from PIL import Image

    from gutout.train.data import load_splits as load_datasets

    for split, classes in (("train", ("cat", "dog")), ("val", ("cat",))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "a.png")
    cfg = TrainConfig(dataset="folder", data=str(tmp_path), backend="torch")
    with pytest.raises(ConfigError, match=r"missing from val: \['dog'\]; only in val: none"):
        load_datasets(cfg)


def test_non_finite_loss_names_member_epoch_and_step(data, tmp_path):
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path), epochs=1, batch_size=32, wandb="disabled", num_threads=0, ensemble=2
    )
    trainer = Trainer(cfg, log=lambda *a: None)
    with torch.no_grad():
        trainer.members[1].model.fc.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="member 1 at epoch 0, step 0"):
        trainer.run()


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_metrics(data, tmp_path):
    args = base_args(data, tmp_path, "--ensemble", "2", "--epochs", "4", "--wandb", "disabled", "--subset", "384")
    cmd = [sys.executable, "-m", "gutout.train.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([*cmd, "--name", "straight"], check=True, env=env, capture_output=True, timeout=600)
    straight = read_metrics(tmp_path / "straight")

    victim = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--name", "killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (victim / "checkpoint.pt").exists() and time.time() < deadline:  # after the first epoch...
        time.sleep(0.05)
    time.sleep(0.2)  # ...and somewhere inside the next one (short: a fast machine must not finish first)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = read_metrics(victim)
    assert 1 <= len(partial) < 4, "the kill must land mid-run"
    subprocess.run([*cmd, "--name", "killed", "--resume"], check=True, env=env, capture_output=True, timeout=600)
    resumed = read_metrics(victim)
    assert [without_timing(r) for r in resumed] == [without_timing(r) for r in straight]
    # The step log continues where the checkpoint left it: no gap, no duplicate, the same losses.
    step_values = lambda run: [  # noqa: E731
        {k: v for k, v in r.items() if k not in ("step/img_per_s", "step/loader_wait_frac", "step/ms")}
        for r in read_run_metrics(run)[1]
    ]
    assert step_values(victim) == step_values(tmp_path / "straight") != []


def test_compare_runs_each_configuration_once_and_writes_results(data, tmp_path):
    args = [
        "compare",
        "fashion-mnist",
        "--data",
        str(data),
        "--runs",
        "none,cutout,gutout-area",
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--subset",
        "128",
        "--val-split",
        "128",
        "--batch-size",
        "32",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    text = (tmp_path / "results.md").read_text()
    for row in ("| none | – | 0,1 | ", "| cutout | 1 | 0,1 | reference |", "| gutout-area | 0.5 | 0,1 | "):
        assert row in text, text
    assert "Metrics on the validation split (128 training samples held out" in text
    assert "4.39 % → 4.02 %" in text and (tmp_path / "results.png").exists()
    cfg = read_metrics(tmp_path / "fashion-mnist-gutout-area-k1-s1")[-1]
    assert cfg["epoch"] == 1 and cfg["gutout/erased_frac"] > 0
    again = CliRunner().invoke(main, [*args, "--split", "test"])  # finished runs are not repeated
    assert again.exit_code == 0 and again.output.count("done already") == 6
    assert "the test set, evaluated once after the last epoch" in (tmp_path / "results.md").read_text()
    bad = CliRunner().invoke(main, [*args[:5], "mixup", *args[6:]])
    assert bad.exit_code != 0 and "unknown comparison run 'mixup'" in bad.output
    nothing = CliRunner().invoke(main, [*args, "--time-budget", "0", "--runs", "random-erasing"])
    assert nothing.exit_code != 0 and "no run finished" in nothing.output
    config = tmp_path / "compare.yaml"
    config.write_text("epochs: 1\nensemble: 2\n")  # a config file sets what compare's own defaults would
    from_file = CliRunner().invoke(
        main,
        [
            "compare",
            "fashion-mnist",
            "--data",
            str(data),
            "--runs",
            "none",
            "--seeds",
            "1",
            "--subset",
            "128",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "f"),
            "--config",
            str(config),
            "--no-progress",
            "--val-split",
            "64",
        ],
    )
    assert from_file.exit_code == 0, from_file.output
    assert [r["epoch"] for r in read_metrics(tmp_path / "f" / "fashion-mnist-none-k2-s0")] == [0]
    other = CliRunner().invoke(main, [*args, "--p", "0.9"])  # same run names, another configuration
    assert other.exit_code != 0 and "fashion-mnist-cutout-k1-s0 holds a run of another configuration" in other.output
    assert "p=1.0 there, 0.9 here" in other.output


def test_gutout_area_matches_cutouts_measured_erased_area():
    from gutout.cut import CutConfig, plan_cuts
    from gutout.train.compare import CUTOUT_SIZE, cutout_erased_fraction, run_overrides

    side = CUTOUT_SIZE["fashion-mnist"]
    area = run_overrides("gutout-area", "fashion-mnist")["area"]
    assert area == cutout_erased_fraction(side) == pytest.approx(0.4375**2)
    plan = plan_cuts(
        None,
        None,
        torch.zeros(20000, 4),
        None,
        (28, 28),
        CutConfig(policy="cutout", size=side, p=1.0),
        torch.Generator().manual_seed(0),
    )
    box = plan.box.long()
    erased = ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).float().mean() / 28**2
    assert float(erased) == pytest.approx(area, rel=0.02)
    with pytest.raises(ConfigError, match="Cutout side 1.5"):
        cutout_erased_fraction(1.5)


def test_eval_every_skips_scoring_between_and_changes_nothing_else(data, tmp_path):
    from tests.conftest import small_run

    runs = {n: small_run(data, tmp_path, name=f"every-{n}", epochs=3, eval_every=n, val_split=64) for n in (1, 2)}
    for cfg in runs.values():
        Trainer(cfg, log=lambda *a: None).run()
    every, second = (read_run_metrics(tmp_path / f"every-{n}")[0] for n in (1, 2))
    assert ["val/ensemble/acc" in r for r in second] == [False, True, True]  # epoch 1, and the last always
    assert second[0]["time/eval_s"] < every[0]["time/eval_s"]
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}  # noqa: E731
    # Scoring draws no randomness: the training and the last epoch's metrics are the same either way.
    assert untimed(second[-1]) == untimed(every[-1])
    assert {k: v for k, v in untimed(every[0]).items() if not k.startswith("val/")} == untimed(second[0])
    # So a finished run counts as done for a comparison that scores less often (and resumes under it).
    from gutout.train.compare import finished

    assert finished(runs[2], tmp_path / "every-1") == every[-1]
    with pytest.raises(ConfigError, match="eval_every"):
        make_config(eval_every=0)


def test_checkpoint_minutes_writes_mid_epoch_checkpoints_by_the_clock(data, tmp_path, monkeypatch):
    from gutout.train import checkpoint
    from tests.conftest import small_run

    saved = checkpoint.save
    positions = []  # (epoch, step) of every checkpoint written; step None at an epoch's end

    def recording_save(run_dir, epoch, members, common, layout, runtime, step=None, keep_latest=True):
        positions.append((epoch, step))
        saved(run_dir, epoch, members, common, layout, runtime, step, keep_latest)

    monkeypatch.setattr(checkpoint, "save", recording_save)
    for name, minutes, expected in (
        ("often", 1e-9, [(0, 1), (0, 2), (0, 3), (0, None)]),  # 128 samples, batch 32: after each step but the last
        ("seldom", 60.0, [(0, None)]),
    ):
        positions.clear()
        cfg = small_run(data, tmp_path, name=name, epochs=1, subset=128, checkpoint_minutes=minutes)
        Trainer(cfg, log=lambda *a: None).run()
        assert positions == expected, name
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        make_config(checkpoint_minutes=0)
