"""The instruments that decide whether Gutout works: the validation split, paired statistics, occlusion robustness,
temperature scaling, and the options that set them."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from gutout.config import ConfigError
from gutout.pipelines.datasets import stratified_split
from gutout.train.cli import main
from gutout.train.compare import Arms, parse_seeds, results_markdown, summarise
from gutout.train.config import TrainConfig, make_config
from gutout.train.data import load_splits as load_datasets
from gutout.train.evaluation import OcclusionConfig, cam_similarity
from gutout.train.metrics import fit_temperature
from gutout.train.models import build_model
from gutout.train.stats import estimate, paired_difference, t_quantile
from gutout.train.tracking import read_metrics
from gutout.train.trainer import Trainer
from tests.conftest import fake_fashion_mnist, small_run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=1024, n_test=200)


def image_keys(dataset) -> set[bytes]:
    return {bytes(image.numpy().tobytes()) for image in dataset.images}


# -- the validation split -----------------------------------------------------------------------------------------


def test_stratified_split_is_disjoint_complete_and_proportional():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)[torch.randperm(1000, generator=torch.Generator())]
    held, rest = stratified_split(labels, 101, torch.Generator().manual_seed(0))
    assert len(held) == 101 and len(rest) == 899
    assert set(held.tolist()).isdisjoint(rest.tolist()) and set(held.tolist()) | set(rest.tolist()) == set(range(1000))
    counts = torch.bincount(labels[held], minlength=3).tolist()
    assert all(abs(c - 101 * share) < 1 for c, share in zip(counts, (0.5, 0.3, 0.2), strict=True)), counts
    again, _ = stratified_split(labels, 101, torch.Generator().manual_seed(0))
    assert torch.equal(held, again)
    with pytest.raises(ValueError, match="cannot hold out 1000 of 1000"):
        stratified_split(labels, 1000, torch.Generator())


def test_validation_split_is_the_same_for_every_seed_and_disjoint_from_training(data):
    splits = {seed: load_datasets(TrainConfig(data=str(data), val_split=200, subset=300, seed=seed)) for seed in (0, 1)}
    val0, val1 = image_keys(splits[0].val), image_keys(splits[1].val)
    assert len(val0) == 200 and val0 == val1  # seeded apart from the model seed
    for seed, split in splits.items():
        train = image_keys(split.train)
        assert len(train) == 300 and train.isdisjoint(val0), seed  # --subset is drawn from what validation left
    assert image_keys(splits[0].train) != image_keys(splits[1].train)  # ...with the run's seed
    plain = load_datasets(TrainConfig(data=str(data), subset=300))
    assert plain.val is None and plain.train.fingerprint != splits[0].train.fingerprint
    assert TrainConfig(val_split=200).identity()["val_split"] == 200  # resume and compare tell the runs apart


def test_train_with_a_validation_split_reads_the_test_set_once(data, tmp_path):
    args = [
        "train",
        "fashion-mnist",
        "--data",
        str(data),
        "--out",
        str(tmp_path),
        "--batch-size",
        "32",
        "--eval-batch-size",
        "256",
        "--num-threads",
        "0",
        "--no-progress",
        "--wandb",
        "disabled",
        "--ensemble",
        "2",
        "--epochs",
        "2",
        "--subset",
        "256",
        "--val-split",
        "128",
        "--name",
        "v",
    ]
    started = time.perf_counter()
    result = CliRunner().invoke(main, args)
    wall = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert (
        "(256 train / 128 val / 200 test)" in result.output
        and "| model | val acc (%) | val NLL | test acc" in result.output
    )
    records = read_metrics(tmp_path / "v")[0]
    assert all("val/ensemble/acc" in r and "val/member/1/nll" in r for r in records)
    assert not any(key.startswith("test/") for key in records[0])  # the test set is read once, at the end
    last = records[-1]
    for split in ("val", "test"):
        for key in (
            "ensemble/acc",
            "ensemble/nll_ts",
            "ensemble/ece_ts",
            "ensemble/occlusion/salient_acc",
            "member/1/occlusion/random_acc",
            "ensemble/occlusion/salient_box_acc",
        ):
            assert f"{split}/{key}" in last, f"{split}/{key}"
    assert last["val/ensemble/nll_ts"] <= last["val/ensemble/nll"] + 1e-9
    assert last["time/run_s"] == pytest.approx(sum(r["time/epoch_s"] for r in records))
    parts = ("train_s", "refresh_s", "eval_s", "checkpoint_s", "other_s")
    for record in records:  # the parts add up to the epoch and none overlaps another (no negative rest)
        assert record["time/epoch_s"] == pytest.approx(sum(record[f"time/{part}"] for part in parts))
        assert record["time/other_s"] >= 0 and record["time/eval_s"] > 0
    assert records[0]["time/checkpoint_s"] == 0 < records[1]["time/checkpoint_s"]  # epoch 0's write is epoch 1's
    assert last["time/run_s"] < wall  # the epochs' windows lie inside the run, one after another


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--val-split", "-1"], "val_split=-1 must be an integer >= 0"),
        (["--val-split", "1024"], "--val-split 1024 leaves none of the 1024 training samples"),
        (["--val-split", "1000", "--subset", "100"], "--subset 100 exceeds the 24 training samples left after"),
        (["--width", "0"], "width=0.0 must lie in (0.0, 64.0]"),
        (["--model", "resnet18", "--width", "2"], "width=2.0 applies to the CIFAR-style models"),
    ],
)
def test_bad_evidence_options_name_themselves(data, tmp_path, extra, message):
    args = [
        "train",
        "fashion-mnist",
        "--data",
        str(data),
        "--out",
        str(tmp_path),
        "--epochs",
        "1",
        "--no-progress",
        "--wandb",
        "disabled",
        *extra,
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_compare_option_errors_name_the_option(data, tmp_path):
    base = ["compare", "fashion-mnist", "--data", str(data), "--out", str(tmp_path), "--no-progress"]
    for extra, message in [
        (["--seeds", "abc"], "--seeds 'abc' must be a count"),
        (["--runs", "none,cutout", "--reference", "gutout-box"], "--reference 'gutout-box' is not one of the --runs"),
        (["--split", "val", "--val-split", "0"], "--split val needs a validation split"),
        (["--runs", "random-erasing-0.3"], "comparison run 'random-erasing' takes no value"),
    ]:
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code != 0 and message in result.output, (extra, result.output)


def test_parse_seeds():
    assert parse_seeds("5") == [0, 1, 2, 3, 4]
    assert parse_seeds("10-14") == [10, 11, 12, 13, 14]
    assert parse_seeds("3,7,9") == [3, 7, 9]
    for bad in ("0", "4-2", "1,1", "x", "-3"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_compare_records_outlive_the_run_directories(data, tmp_path):
    records = tmp_path / "records"
    options = "--runs none,cutout --seeds 1 --epochs 1 --subset 64 --val-split 64 --batch-size 32 --no-progress"
    args = ["compare", "fashion-mnist", "--data", str(data), *options.split(), "--records", str(records)]
    first = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    kept = records / "fashion-mnist-none-k1-s0"
    assert sorted(p.name for p in kept.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert read_metrics(kept) == ([read_metrics(tmp_path / "a" / "fashion-mnist-none-k1-s0")[0][-1]], [])
    # Another --out, where no run directory exists: nothing trains, and the table is the same.
    again = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b")])
    assert again.exit_code == 0 and again.output.count(f"done already (kept in {records})") == 2, again.output
    assert not (tmp_path / "b" / "fashion-mnist-none-k1-s0").exists()
    table = lambda out: (out / "results.md").read_text().split("| run |")[1]  # noqa: E731 - rows, not the command
    assert table(tmp_path / "a") == table(tmp_path / "b")
    # A kept record of another configuration is refused, naming the option that differs.
    other = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c"), "--batch-size", "16"])
    assert other.exit_code != 0 and "batch_size=32 there, 16 here" in other.output, other.output


# -- paired statistics ----------------------------------------------------------------------------------------------


def test_student_t_quantiles_match_the_table():
    # Two-sided 95 % points of Student's t (any statistics table).
    for df, t in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert t_quantile(0.95, df) == pytest.approx(t, abs=1e-3)
    assert t_quantile(0.99, 5) == pytest.approx(4.032, abs=1e-3)


def test_paired_difference_matches_a_hand_computation():
    run = {0: 10.0, 1: 11.0, 2: 12.5, 7: 99.0}  # seed 7 has no partner and is left out
    reference = {0: 9.0, 1: 10.5, 2: 11.0}
    d = paired_difference(run, reference)
    # differences 1.0, 0.5, 1.5: mean 1.0, sd 0.5, se 0.5 / sqrt(3); t(0.975, 2) = 4.302653
    assert (d.n, d.mean) == (3, pytest.approx(1.0))
    assert d.se == pytest.approx(0.5 / math.sqrt(3))
    assert (d.lo, d.hi) == (
        pytest.approx(1.0 - 4.302653 * 0.288675, abs=1e-5),
        pytest.approx(1.0 + 4.302653 * 0.288675, abs=1e-5),
    )
    assert not d.excludes_zero
    tight = paired_difference({0: 2.0, 1: 2.1, 2: 2.2}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert tight.excludes_zero and tight.lo > 0
    assert math.isnan(estimate([3.0]).lo) and not estimate([3.0]).excludes_zero
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def fake_record(error: float, erased: float = 0.0) -> dict:
    acc = 1 - error / 100
    record = {"gutout/erased_frac": erased, "time/run_s": 60.0, "throughput/train_img_per_s": 1000.0}
    for split in ("val", "test"):
        e = f"{split}/ensemble"
        record |= {
            f"{e}/acc": acc,
            f"{e}/nll": 0.3,
            f"{e}/ece": 0.01,
            f"{e}/nll_ts": 0.29,
            f"{e}/ece_ts": 0.005,
            f"{e}/occlusion/random_acc": acc - 0.1,
            f"{e}/occlusion/salient_acc": acc - 0.3,
            f"{e}/occlusion/salient_box_acc": acc - 0.2,
        }
    return record


def test_compare_table_reports_paired_differences_with_their_intervals():
    base = TrainConfig(val_split=5000, subset=5000, epochs=30)
    results = {
        "none": {0: fake_record(10.0), 1: fake_record(11.0), 2: fake_record(12.5)},
        "cutout": {0: fake_record(9.0, 0.19), 1: fake_record(10.5, 0.19), 2: fake_record(11.0, 0.19)},
        "gutout-area": {0: fake_record(7.9), 1: fake_record(8.9), 2: fake_record(10.4)},
    }
    rows = summarise(results, base, "val", "none")
    by_run = {row["run"]: row for row in rows}
    assert "delta_error" not in by_run["none"]
    delta = by_run["cutout"]["delta_error"]  # the hand computation above, with the signs reversed
    assert delta.mean == pytest.approx(-1.0) and delta.se == pytest.approx(0.5 / math.sqrt(3))
    assert by_run["cutout"]["error"].mean == pytest.approx(10.1667, abs=1e-4)
    assert by_run["cutout"]["error"].se == pytest.approx(torch.tensor([9.0, 10.5, 11.0]).std().item() / math.sqrt(3))
    area = by_run["gutout-area"]["delta_error"]  # exactly -2.1 on every seed: a zero-width interval
    assert area.mean == pytest.approx(-2.1) and area.excludes_zero
    text = results_markdown(rows, base, "gutout compare ...", "val", "none")
    assert "| none | – | 0,1,2 | reference | 11.17 ± 0.73 |" in text, text
    assert "| cutout | 1 | 0,1,2 | -1.00 [-2.24, +0.24] | 10.17 ± 0.60 |" in text
    assert "| gutout-area | 0.5 | 0,1,2 | **-2.10 [-2.10, -2.10]** |" in text
    assert "Mean ± standard error over seeds" in text and "validation split (5000 training samples" in text
    arms = Arms.with_file({"smoothed": {"policy": "none", "label_smoothing": 0.1}})  # cuts nothing: no p
    rows = summarise({"smoothed": {0: fake_record(10.0)}}, base, "val", None, arms)
    assert "| smoothed | – | 0 |" in results_markdown(rows, base, "gutout compare ...", "val", None)


# -- calibration and occlusion ----------------------------------------------------------------------------------------


def test_temperature_scaling_never_raises_the_nll_it_was_fitted_on():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=g)
    clean = torch.randn(2000, 10, generator=g) + 2.5 * F.one_hot(labels, 10)  # informative logits
    for scale, direction in [(6.0, 1), (0.3, -1), (1.0, 0)]:  # over-confident, under-confident, as is
        logits = clean * scale
        t = fit_temperature(logits, labels)
        assert F.cross_entropy(logits / t, labels) <= F.cross_entropy(logits, labels) + 1e-7
        if direction:
            assert (t - 1) * direction > 0.2, (scale, t)  # over-confident logits are cooled, under-confident heated
    constant = torch.zeros(50, 10)  # nothing to fit: T stays a valid number and the NLL does not rise
    assert fit_temperature(constant, labels[:50]) > 0


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A two-member ensemble trained on the synthetic blobs, each class a bright bar at its own place."""
    out = tmp_path_factory.mktemp("runs")
    cfg = small_run(data, out, epochs=3, eval_batch_size=256, ensemble=2, policy="none")
    trainer = Trainer(cfg, log=lambda *a: None)
    final = trainer.run()
    return trainer, final


def test_occlusion_of_nothing_is_plain_accuracy(trained):
    trainer, final = trained
    nothing = trainer.evaluator.occlusion(trainer.test_set, OcclusionConfig(area=0.0, side=0.0))
    for key in ("random", "salient", "salient_box"):
        for m in range(2):
            assert nothing[f"member/{m}/occlusion/{key}_acc"] == final[f"test/member/{m}/acc"]
        assert nothing[f"ensemble/occlusion/{key}_acc"] == final["test/ensemble/acc"]


def test_salient_occlusion_costs_more_accuracy_as_the_area_grows(trained):
    trainer, final = trained
    assert final["test/ensemble/acc"] > 0.7  # the blobs are learnt (chance: 0.1), so erasing them must hurt
    results = [
        trainer.evaluator.occlusion(trainer.test_set, OcclusionConfig(area=a, side=math.sqrt(a)))
        for a in (0.0, 0.2, 0.5)
    ]
    salient = [r["ensemble/occlusion/salient_acc"] for r in results]
    # The top 50 % of cells hold the top 20 %: never better, and on 200 test images of a 3-epoch model the second
    # step's size varies with the CPU's float arithmetic (0.05 to over 0.1), so only its sign is checked.
    assert salient[0] > salient[1] + 0.1 and salient[1] >= salient[2], salient
    # Erasing where the maps point costs more than erasing a random square of about the same area.
    assert results[1]["ensemble/occlusion/salient_acc"] < results[1]["ensemble/occlusion/random_acc"] - 0.05, results[1]
    for m in range(2):
        assert results[2][f"member/{m}/occlusion/salient_acc"] < final[f"test/member/{m}/acc"] - 0.2


def test_the_random_square_is_the_same_for_every_member_and_call(trained):
    trainer, _ = trained
    a = trainer.evaluator.occlusion(trainer.test_set, OcclusionConfig(side=0.5))
    b = trainer.evaluator.occlusion(trainer.test_set, OcclusionConfig(side=0.5))
    assert a == b  # fixed squares, and the global RNG is not consumed
    state = torch.get_rng_state()
    trainer.evaluator.occlusion(trainer.test_set)
    assert torch.equal(state, torch.get_rng_state())


def test_map_similarity_is_the_mean_pairwise_cosine_of_the_members_maps():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 3, 3, generator=g)
    left, right = torch.zeros(5, 3, 3), torch.zeros(5, 3, 3)
    left[:, :, 0], right[:, :, 2] = 1.0, 1.0  # no cell in common
    assert cam_similarity(torch.stack([a, 3 * a])) == pytest.approx(1.0)  # the same evidence, up to scale
    assert cam_similarity(torch.stack([left, right])) == 0.0
    # Three members: the mean over the three pairs (1, 0, 0).
    assert cam_similarity(torch.stack([left, 2 * left, right])) == pytest.approx(1 / 3)
    by_hand = torch.nn.functional.cosine_similarity(a.flatten(1), left.flatten(1), dim=1).mean()
    assert cam_similarity(torch.stack([a, left])) == pytest.approx(float(by_hand))


def test_an_ensembles_final_record_has_its_members_map_similarity(trained):
    trainer, final = trained
    maps = trainer.evaluator._maps(trainer.test_set)
    assert final["test/ensemble/cam_similarity"] == pytest.approx(cam_similarity(maps))
    assert 0 < final["test/ensemble/cam_similarity"] < 1


# -- capacity ---------------------------------------------------------------------------------------------------------


def test_resnet20_and_the_width_multiplier():
    net = build_model("resnet20", 10, 1)
    assert [len(getattr(net, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    wide = build_model("resnet20", 10, 1, width=2.0)
    assert [getattr(wide, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [32, 64, 128]
    assert wide(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert make_config(model="resnet20", width=1.5).width == 1.5
