"""The study's training variants: the cut schedule (--cut-start, --p-ramp), clean pairs (--pair), maps of
correctly classified samples only (--correct-only) and the loss-space rival (--diversity-loss). The pixel-level
variants (threshold rules, keep) are kernel cases (tests/conftest.py) and in tests/test_cut.py."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from gutout import ActivationCapture, SaliencyCache
from gutout.pipelines import GutoutLoader
from gutout.train.cli import main
from gutout.train.config import make_config
from gutout.train.diversity import class_cams, exchange_peer_cams, similarity
from gutout.train.models import build_model
from gutout.train.tracking import read_metrics
from gutout.train.trainer import Trainer
from tests.conftest import fake_fashion_mnist, small_run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=192, n_test=64)


small = small_run


def records(run_dir):
    return read_metrics(run_dir)[0]


def untimed(record):
    return {k: v for k, v in record.items() if not k.startswith(("time/", "throughput/"))}


def test_p_ramp_and_cut_start():
    cfg = make_config(p=0.8, p_ramp=(2, 6))
    assert [round(cfg.p_at(e), 3) for e in range(8)] == [0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 0.8]
    assert make_config(p=0.8).p_at(3) == 0.8
    with pytest.raises(ValueError, match="p_ramp=\\(3, 3\\)"):
        make_config(p_ramp=(3, 3))
    cfg = make_config(cut_start=3, epochs=6)
    trainer_like = type("T", (), {"cfg": cfg})()
    due = [Trainer._refresh_due(trainer_like, b) for b in range(6)]
    assert due == [False, False, False, True, True, True]  # the first maps are made for epoch 3
    # cut_start 0 every 2nd epoch: a pass maps the untrained model first; harvest has maps after an epoch, as with 1
    for refresh, expected in (("pass", [True, False, True, False, True, False]), ("harvest", [False, True] * 3)):
        trainer_like.cfg = make_config(cut_start=0, refresh_every=2, epochs=6, refresh=refresh)
        assert [Trainer._refresh_due(trainer_like, b) for b in range(6)] == expected, refresh


def test_a_ramped_run_cuts_nothing_before_the_ramp(data, tmp_path):
    cfg = small(data, tmp_path, policy="cutout", p=1.0, p_ramp=(1, 2), epochs=3, name="ramp")
    Trainer(cfg, log=lambda *a: None).run()
    erased = [r["gutout/erased_frac"] for r in records(tmp_path / "ramp")]
    assert erased[0] == 0 and erased[1] == 0 and erased[2] > 0.1  # p = 0, 0, then 1


def test_pair_trains_each_cut_sample_twice_in_its_step(data, tmp_path):
    cfg = small(data, tmp_path, policy="cutout", p=0.5, pair=True, epochs=1)
    trainer = Trainer(cfg, log=lambda *a: None)
    member = trainer.members[0]
    member.loader.set_epoch(0)
    batch = next(member.loader.batches(keep_clean=True))
    cut = int((member.loader.stats.last > 0).sum())
    assert 0 < cut < len(batch.labels) and not torch.equal(batch.clean, batch.images)
    _, forwarded, _ = trainer._step(member, batch, trainer._inputs(member, batch), harvest=False)
    assert forwarded == len(batch.labels) + cut


def test_pair_keeps_the_cut_batch_and_adds_the_uncut_images(data, tmp_path):
    # --pair asks the loader for the images before the cut: the cut batch must be the one a run without --pair trains
    # on, and the clean views the images of an uncut run. (Where the cut is fused into the host's normalising pass,
    # keep_clean takes the unfused path; tests/test_host_finish.py checks that the two give the same batch.)
    cut = small(data, tmp_path, policy="cutout", p=0.5, epochs=1, name="cut")
    uncut = small(data, tmp_path, policy="none", epochs=1, name="uncut")
    (cutting,), (plain,) = (Trainer(cfg, log=lambda *a: None).members for cfg in (cut, uncut))
    for loader in (cutting.loader, plain.loader):
        loader.set_epoch(0)
    fast, paired, reference = (
        next(cutting.loader.batches()),
        next(cutting.loader.batches(keep_clean=True)),
        next(plain.loader.batches()),
    )
    assert torch.equal(paired.images, fast.images) and torch.equal(paired.labels, fast.labels)
    assert torch.equal(paired.clean, reference.images) and not torch.equal(paired.clean, paired.images)


def test_diversity_penalty_gradient_is_right():
    g = torch.Generator().manual_seed(0)
    activations = torch.rand(3, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 4])
    peers = [torch.rand(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    penalty = lambda a, w: similarity(class_cams(a, w, targets).double(), peers)  # noqa: E731
    assert torch.autograd.gradcheck(penalty, (activations, weight), eps=1e-6, atol=1e-6)
    with torch.no_grad():
        positive = class_cams(activations, weight.abs(), targets)  # no map is all zero here
        assert float(similarity(positive, [positive])) == pytest.approx(1.0)  # a map is fully similar to itself
        assert float(similarity(positive, [torch.zeros_like(positive)])) == 0.0  # and to nothing, not at all


def test_diversity_loss_zero_is_todays_run_and_positive_changes_it(data, tmp_path):
    base = dict(ensemble=2, policy="none")
    plain = small(data, tmp_path, name="plain", **base)
    zero = small(data, tmp_path, name="zero", diversity_loss=0.0, **base)
    some = small(data, tmp_path, name="some", diversity_loss=1.0, **base)
    for cfg in (plain, zero, some):
        Trainer(cfg, log=lambda *a: None).run()
    assert [untimed(r) for r in records(tmp_path / "plain")] == [untimed(r) for r in records(tmp_path / "zero")]
    assert records(tmp_path / "some")[-1]["test/member/0/nll"] != records(tmp_path / "plain")[-1]["test/member/0/nll"]


def test_peer_maps_reach_each_shard_of_a_ddp_group_from_the_process_that_holds_the_peer():
    # Four processes: members 0 and 1, each trained by a DDP group of two (shards 0 and 1), every process with its
    # own step inputs. Each must get its peer's maps of *its own* inputs, made by the process holding that peer
    # and the same shard, exactly as one process holding both members makes them.
    torch.manual_seed(0)
    nets = [build_model("small-resnet", 3, 1).eval() for _ in range(2)]
    layout = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (member, shard) of ranks 0..3
    inputs = [(torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4,))) for _ in layout]
    barrier, board, results = threading.Barrier(len(layout)), [None] * len(layout), [None] * len(layout)

    def rank(r: int) -> None:
        def gather(value):  # all_gather_object across the four threads
            board[r] = value
            barrier.wait()
            everyone = list(board)
            barrier.wait()
            return everyone

        member, shard = layout[r]
        net = copy.deepcopy(nets[member])  # each process its own replica (hooks are per module)
        results[r] = exchange_peer_cams({member: net}, {member: inputs[r]}, shard, 2, "layer3", gather)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(layout))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for r, (member, _) in enumerate(layout):
        alone = exchange_peer_cams({0: nets[0], 1: nets[1]}, {member: inputs[r]}, 0, 2, "layer3")
        assert torch.equal(results[r][member][0], alone[member][0]), r


def test_diversity_loss_options_are_checked(data, tmp_path):
    with pytest.raises(ValueError, match="diversity_loss=0.5 needs --ensemble >= 2"):
        make_config(diversity_loss=0.5)
    args = ["train", "fashion-mnist", "--data", str(data), "--out", str(tmp_path), "--diversity-loss", "-1"]
    result = CliRunner().invoke(main, [*args, "--ensemble", "2"])
    assert result.exit_code != 0 and "diversity_loss=-1.0" in result.output


def test_compare_runs_named_arms_from_its_config_file(data, tmp_path):
    config = tmp_path / "arms.yaml"
    config.write_text("epochs: 1\narms:\n  cutout-pair: {policy: cutout, p: 1.0, pair: true}\n")
    runs = "none,cutout-pair,keep-0.3,gutout-sigma-1.0"
    options = "--seeds 1 --subset 64 --val-split 64 --batch-size 32 --no-progress --reference none".split()
    args = ["compare", "fashion-mnist", "--data", str(data), *options, "--out", str(tmp_path / "c")]
    result = CliRunner().invoke(main, [*args, "--runs", runs, "--config", str(config)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "c" / "results.md").read_text()
    for row in ("| cutout-pair | 1 | 0 |", "| keep-0.3 | 1 | 0 |", "| gutout-sigma-1.0 | 0.5 | 0 |"):
        assert row in text, text
    pair = records(tmp_path / "c" / "fashion-mnist-cutout-pair-k1-s0")[-1]
    plain = records(tmp_path / "c" / "fashion-mnist-none-k1-s0")[-1]
    assert pair["time/train_s"] > 0 and plain["gutout/erased_frac"] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms:\n  broken: 3\n")
    result = CliRunner().invoke(main, [*args, "--config", str(bad), "--runs", "broken"])
    assert result.exit_code != 0 and "arm 'broken' must map option names to values" in result.output


def test_unusable_entries_read_as_missing_and_travel_between_processes():
    cache = SaliencyCache(1, 4, (2, 2))
    cache.update(0, torch.arange(4), torch.ones(4, 2, 2), usable=torch.tensor([True, False, True, False]))
    members, indices, maps, usable = cache.dirty_entries()
    assert usable.tolist() == [True, False, True, False]
    cache.publish(0)
    assert cache.lookup(0, torch.arange(4))[1].tolist() == [True, False, True, False]
    other = SaliencyCache(1, 4, (2, 2))  # another rank: receives the gathered entries
    other.write_entries(members, indices, maps, usable=usable)
    other.publish(0)
    assert torch.equal(other.valid, cache.valid)


def random_problem(samples: int, side: int, seed: int):
    """(uint8 images (N, side, side), labels of 3 classes, an untrained small-resnet): a refresh's inputs."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (samples, side, side), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (samples,), generator=g)
    torch.manual_seed(0)
    return images, labels, build_model("small-resnet", 3, 1)


def test_correct_only_keeps_the_maps_of_samples_the_owner_got_right():
    images, labels, net = random_problem(40, 16, seed=0)
    cache = SaliencyCache(1, 40, (2, 2))
    loader = GutoutLoader.from_arrays(images, labels, classes=("a", "b", "c"), cache=cache, backend="tensor")
    loader.refresh(net, correct_only=True)
    right = torch.zeros(40, dtype=torch.bool)
    with torch.no_grad():
        net.eval()
        for batch in loader.view("refresh"):
            right[batch.indices] = net(batch.images).argmax(1) == batch.labels
    assert 0 < int(right.sum()) < 40  # an untrained net: some right, some wrong
    assert torch.equal(cache.valid[0], right)
    loader.refresh(net)  # without the option every map is usable
    assert bool(cache.valid.all())


def test_correct_only_harvest_marks_the_misclassified_views(data, tmp_path):
    cfg = small(data, tmp_path, policy="threshold", refresh="harvest", correct_only=True, epochs=1)
    trainer = Trainer(cfg, log=lambda *a: None)
    member = trainer.members[0]
    member.loader.set_epoch(0)
    batch = next(member.loader.batches())
    with ActivationCapture(member.net, trainer.layer) as capture:
        member.net(batch.images)
    wrong = torch.arange(len(batch.labels)) % 2 == 1  # logits that get every other sample wrong
    logits = F.one_hot(torch.where(wrong, (batch.labels + 1) % 10, batch.labels), 10).float()
    trainer._harvest(member, capture.activations, logits, batch)
    trainer.cache.publish(0)
    assert trainer.cache.lookup(0, batch.indices)[1].tolist() == (~wrong).tolist()


def test_a_refresh_part_writes_its_samples_as_a_full_refresh_would():
    images, labels, net = random_problem(50, 16, seed=1)
    images[:20] //= 4  # a darker first part: statistics measured on a part would differ from the whole's
    full, partial = SaliencyCache(1, 50, (4, 4)), SaliencyCache(1, 50, (4, 4))
    for cache, part in ((full, None), (partial, (1, 3))):
        loader = GutoutLoader.from_arrays(images, labels, cache=cache, backend="tensor", batch_size=16)
        loader.refresh(net, publish=False, part=part)
    members, indices, maps, _ = partial.dirty_entries()
    assert indices.tolist() == list(range(1, 50, 3))  # positions 1, 4, 7, ...: the part and nothing else
    assert torch.allclose(maps.float(), full.dirty_entries()[2][indices].float(), atol=2e-3)
    with pytest.raises(ValueError, match="refresh part 3 of 3"):
        loader.refresh(net, part=(3, 3))


def test_a_refresh_at_a_smaller_size_is_the_refresh_of_a_loader_of_that_size():
    images, labels, net = random_problem(40, 32, seed=2)
    caches = {name: SaliencyCache(1, 40, (8, 8)) for name in ("reduced", "small loader", "full")}
    for name, loader_size, refresh_size in (("reduced", None, 16), ("small loader", 16, None), ("full", None, None)):
        loader = GutoutLoader.from_arrays(
            images, labels, cache=caches[name], backend="tensor", batch_size=16, image_size=loader_size
        )
        loader.refresh(net, publish=False, image_size=refresh_size)
    reduced, small_loader, full = (caches[name].dirty_entries()[2].float() for name in caches)
    assert reduced.shape == full.shape == (40, 8, 8)  # 4 x 4 maps, resampled to the cache's grid
    assert torch.equal(reduced, small_loader)
    assert not torch.allclose(reduced, full, atol=0.05)  # the size took effect
    with pytest.raises(ValueError, match="refresh_size applies to refresh 'pass', not 'harvest'"):
        make_config(refresh_size=16, refresh="harvest")
    with pytest.raises(ValueError, match="refresh_size=4 is too small for small-resnet"):
        make_config(refresh_size=4, refresh="pass")
    with pytest.raises(ValueError, match="refresh_size=0 must be an integer >= 1"):
        make_config(refresh_size=0, refresh="pass")


def test_the_trainer_refreshes_at_refresh_size(data, tmp_path, monkeypatch):
    sizes = []
    original = GutoutLoader.refresh

    def recording(self, *args, **kwargs):
        sizes.append(kwargs.get("image_size"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GutoutLoader, "refresh", recording)
    Trainer(
        small(data, tmp_path, policy="threshold", epochs=1, cut_start=0, refresh_size=16, refresh="pass"),
        log=lambda *a: None,
    ).run()
    assert sizes and set(sizes) == {16}


def test_refresh_fraction_takes_the_parts_in_turn_after_one_full_refresh():
    cfg = make_config(refresh_fraction=0.5, cut_start=1, refresh_every=1, refresh="pass")
    trainer_like = type("T", (), {"cfg": cfg})()
    parts = [Trainer._refresh_part(trainer_like, b) for b in range(1, 6)]
    assert parts == [None, (0, 2), (1, 2), (0, 2), (1, 2)]
    assert cfg.refresh_parts == 2 and make_config().refresh_parts == 1
    with pytest.raises(ValueError, match="refresh_fraction=0.3 must be 1/N"):
        make_config(refresh_fraction=0.3, refresh="pass")
    with pytest.raises(ValueError, match=r"refresh_fraction applies to refresh 'pass', not 'harvest' \(add --refresh"):
        make_config(refresh_fraction=0.5)  # the default refresh harvests


def test_a_fractional_refresh_run_keeps_every_map(data, tmp_path):
    cfg = small(data, tmp_path, policy="threshold", refresh_fraction=0.5, epochs=3, cut_start=0, refresh="pass")
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.run()
    assert bool(trainer.cache.valid.all())  # the first refresh covered every sample; the parts kept them
