"""One source of truth per setting: the dataset registry, the cut's options in TrainConfig, backend resolution,
and the cache's checkpoint state."""

import builtins
import dataclasses

import pytest
import torch
from click.testing import CliRunner

from gutout import SaliencyCache
from gutout.cache import CacheSnapshotError
from gutout.pipelines import ArrayDataset, GutoutLoader
from gutout.pipelines.datasets import DATASETS, FOLDER_IMAGE_SIZE, STATS, registered
from gutout.pipelines.loader import resolve_backend
from gutout.pipelines.statistics import resolve_stats
from gutout.plan import CutConfig
from gutout.train.cli import main
from gutout.train.compare import CUTOUT_SIZE
from gutout.train.config import TrainConfig, make_config


def test_every_cut_option_is_a_training_option_with_the_librarys_default_but_p():
    cut_fields = {f.name: f.default for f in dataclasses.fields(CutConfig)}
    train_fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert set(cut_fields) <= set(train_fields)
    differing = {k for k, v in cut_fields.items() if train_fields[k] != v}
    assert differing == {"p"}  # the trainer's recipe cuts half the samples; the library cuts what it is given
    cfg = make_config({"gamma": 2.0, "erase_scale": [0.05, 0.2], "erase_ratio": [0.5, 2.0], "kernel": "torch"})
    assert cfg.cut_config() == CutConfig(
        gamma=2.0, erase_scale=(0.05, 0.2), erase_ratio=(0.5, 2.0), kernel="torch", p=0.5
    )
    with pytest.raises(ValueError, match="TrainConfig.gamma=0.0 must lie in"):
        make_config(gamma=0.0)  # the cut's checks, naming the training config


def test_every_cut_option_can_be_set_on_the_command_line(tmp_path):
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for field in dataclasses.fields(CutConfig):
        assert f"--{field.name.replace('_', '-')}" in help_text, field.name
    p_help = " ".join(help_text.split("--p FLOAT")[1].split("--")[0].split())
    assert "(default 0.5)" in p_help, p_help  # defaults read from TrainConfig


def test_options_not_given_leave_the_config_file_and_the_defaults_alone():
    """A flag not on the command line is None to the trainer, not click's False (which turned --amp off)."""
    command = main.commands["train"]
    given = command.make_context("train", ["fashion-mnist"]).params
    unset = {name for name, value in given.items() if value is None}
    assert {"amp", "pair", "resume", "skip_corrupt", "progress"} <= unset
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cli_values = {k: v for k, v in given.items() if k in fields}
    assert make_config({"amp": False}, **cli_values).amp is False
    assert make_config(**cli_values).amp is True


def test_the_registry_is_where_each_dataset_fact_lives():
    assert set(DATASETS) == {"fashion-mnist", "cifar10", "cifar100", "imagenet", "folder"}
    for name, spec in DATASETS.items():
        assert STATS[name] == (spec.mean, spec.std) and CUTOUT_SIZE[name] == spec.cutout_side
        assert len(spec.mean) == len(spec.std)
    assert DATASETS["imagenet"].image_size == FOLDER_IMAGE_SIZE and DATASETS["fashion-mnist"].image_size is None
    assert TrainConfig(dataset="cifar100", data="x").model_name == "small-resnet"
    assert TrainConfig(dataset="folder", data="x").model_name == "resnet18"
    with pytest.raises(ValueError, match="dataset 'cifar10' needs --data PATH"):
        TrainConfig(dataset="cifar10")
    images = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    subset = ArrayDataset(images, torch.zeros(4), ("a",), "cifar10/train[subset]")
    assert registered(subset) is DATASETS["cifar10"]
    from gutout.pipelines import LoaderConfig

    assert resolve_stats(subset, LoaderConfig()) == STATS["cifar10"]
    unknown = ArrayDataset(images + 128, torch.zeros(4), ("a",), "mine")
    assert registered(unknown) is None and resolve_stats(unknown, LoaderConfig())[0] == pytest.approx((128 / 255,) * 3)


def test_backend_auto_needs_no_dali(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia"):
            raise ImportError("No module named 'nvidia'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    arrays = ArrayDataset(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4), ("a",), "x")
    assert resolve_backend("auto", arrays) == "tensor"
    from gutout.pipelines.datasets import FolderDataset

    folder = FolderDataset(tmp_path, ["a/0.png"], torch.zeros(1, dtype=torch.long), ("a",))
    assert resolve_backend("auto", folder) == "torch" and resolve_backend("dali", folder) == "dali"
    loader = GutoutLoader.from_arrays(torch.zeros(8, 8, 8, dtype=torch.uint8), torch.zeros(8), batch_size=4)
    assert len(list(loader)) == 2  # the drop-in loader's default backend runs without DALI


def test_cache_state_round_trips_and_refuses_other_samples():
    cache = SaliencyCache(2, 5, (3, 3), fingerprint="n=5:abc", layer="layer3")
    cache.update(0, torch.arange(5), torch.rand(5, 3, 3))
    cache.publish(epoch=4)
    cache.update(1, torch.tensor([1, 3]), torch.rand(2, 3, 3))  # pending, unpublished
    state = cache.state_dict()
    twin = SaliencyCache(2, 5, (3, 3), fingerprint="n=5:abc", layer="layer3")
    twin.load_state_dict(state)
    assert torch.equal(twin.maps, cache.maps) and torch.equal(twin.valid, cache.valid) and twin.epoch == 4
    twin.publish()
    cache.publish()
    assert torch.equal(twin.maps, cache.maps) and torch.equal(twin.valid, cache.valid)  # the pending buffer too
    other = SaliencyCache(2, 5, (3, 3), fingerprint="n=5:xyz", layer="layer3")
    with pytest.raises(CacheSnapshotError, match="fingerprint: snapshot has 'n=5:abc', this run expects 'n=5:xyz'"):
        other.load_state_dict(state, source="checkpoint.pt")


def test_run_directories_with_renamed_options_are_read_under_the_new_names(tmp_path):
    import yaml

    from gutout.train.config import RENAMED_OPTIONS, ConfigError, read_run_config

    cfg = TrainConfig(cut_start=3)
    recorded = cfg.to_dict()
    for old, new in RENAMED_OPTIONS.items():
        recorded[old] = recorded.pop(new)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert read_run_config(tmp_path).identity() == cfg.identity()
    with pytest.raises(ConfigError, match="warmup_epochs"):  # a user's option with the old name still fails
        make_config(warmup_epochs=3)
    recorded["cut_start"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    with pytest.raises(ConfigError, match="both"):
        read_run_config(tmp_path)


def test_the_eval_batch_is_the_devices_unless_given(tmp_path):
    from gutout.config import ConfigError
    from gutout.train.config import EVAL_BATCH_SIZE
    from gutout.train.trainer import Trainer
    from tests.conftest import fake_fashion_mnist, small_run

    assert TrainConfig().eval_batch_for("cpu") == EVAL_BATCH_SIZE["cpu"] != EVAL_BATCH_SIZE["cuda"]
    assert TrainConfig().eval_batch_for("cuda") == EVAL_BATCH_SIZE["cuda"]
    assert TrainConfig(eval_batch_size=48).eval_batch_for("cuda") == 48
    data = fake_fashion_mnist(tmp_path / "data", n_train=64, n_test=32)
    for given, used in [(None, EVAL_BATCH_SIZE["cpu"]), (48, 48)]:
        trainer = Trainer(small_run(data, tmp_path / "runs", device="cpu", eval_batch_size=given), log=lambda *a: None)
        assert trainer.eval_batch_size == trainer.evaluator.config.batch_size == used
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match=f"eval_batch_size={bad!r} must be an integer"):
            make_config(eval_batch_size=bad)
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    listed = ", ".join(f"{device} {size}" for device, size in EVAL_BATCH_SIZE.items())
    assert f"by device: {listed}" in " ".join(help_text.split())


def test_the_refresh_mode_tells_map_runs_apart_and_not_baselines(tmp_path):
    import yaml

    from gutout.train.compare import check_same_run
    from gutout.train.config import ConfigError

    def recorded(name, **options):  # a run directory recorded under the former default, refresh by a pass
        cfg = TrainConfig(name=name, out=str(tmp_path), refresh="pass", **options)
        cfg.run_dir.mkdir()
        (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        return cfg

    cutout = recorded("cutout", policy="cutout", size=0.25)
    check_same_run(dataclasses.replace(cutout, refresh="harvest"))  # reads no maps: the same run
    gutout = recorded("gutout", policy="threshold")
    with pytest.raises(ConfigError, match="refresh='pass' there, 'harvest' here"):
        check_same_run(dataclasses.replace(gutout, refresh="harvest"))


def test_a_checkpoint_of_the_former_refresh_default_resumes_when_the_policy_reads_no_maps():
    from gutout.train.config import identity_differences

    def stored(**options):  # what a checkpoint made before identity() left out the refresh options holds
        return {
            k: v
            for k, v in TrainConfig(refresh="pass", **options).to_dict().items()
            if k not in TrainConfig.RESUME_FREE
        }

    assert (
        identity_differences(stored(policy="cutout", size=0.25), TrainConfig(policy="cutout", size=0.25).identity())
        == []
    )
    assert identity_differences(stored(policy="threshold"), TrainConfig(policy="threshold").identity()) == [
        ("refresh", "pass", "harvest")
    ]
