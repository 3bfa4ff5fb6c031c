"""The CPU train path that finishes DALI's crops on the host: same crops as DALI's own resize, batches that
stay intact while held, and the cut fused into the normalising pass giving the very batch of the plain path."""

import os

import pytest
import torch

from gutout import GutoutStage, SaliencyCache, StageConfig, cpu_kernel
from gutout.normalise import normalise_uint8
from gutout.pipelines import GutoutLoader
from gutout.pipelines.batch import HostNormalisingSource
from gutout.pipelines.host_finish import OutputPool
from tests.conftest import KERNEL_CASES, random_windows

pytest.importorskip("nvidia.dali")
pytest.importorskip("numba")


def test_pool_reuses_only_batches_nobody_holds():
    pool = OutputPool(capacity=3)
    assert pool.enabled, "this torch's storage use count is readable: pooling is on"
    shape = (2, 3, 4, 4)
    first = pool.take(shape)
    ptr = first.data_ptr()
    second = pool.take(shape)
    assert second.data_ptr() != ptr  # the caller holds the tensor it was given
    view = first[1:]  # a caller keeping only a view still holds the storage
    del first
    third = pool.take(shape)
    assert third.data_ptr() not in (ptr, second.data_ptr())
    del view
    assert pool.take(shape).data_ptr() == ptr  # released: reused, no fresh pages
    assert second.data_ptr() != ptr and third.data_ptr() != ptr
    pool.take((1, 3, 4, 4))  # an epoch's partial last batch keeps its own buffers...
    assert pool.take(shape).data_ptr() == ptr  # ...and does not evict the full-size ones


def test_pool_never_reuses_a_batch_moved_to_shared_memory():
    """Sent to another process (a queue, a DataLoader worker), a batch's storage moves to shared memory; the
    other side's mapping is invisible to the use count, so that buffer must leave the pool."""
    pool = OutputPool(capacity=2)
    batch = pool.take((2, 3))
    ptr = batch.data_ptr()
    batch.share_memory_()  # what torch.multiprocessing does when the batch is put on a queue
    del batch
    assert pool.take((2, 3)).data_ptr() != ptr


def test_both_normalising_paths_give_the_same_bits(monkeypatch):
    g = torch.Generator().manual_seed(8)
    source = torch.randint(0, 256, (3, 3, 9, 11), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([123.7, 116.3, 103.5]), torch.tensor([58.4, 57.1, 57.4])
    fused = normalise_uint8(source, torch.empty(3, 3, 9, 11), mean, std)
    monkeypatch.setattr(cpu_kernel, "_numba", lambda: None)  # the torch path
    plain = normalise_uint8(source, torch.empty(3, 3, 9, 11), mean, std)
    assert torch.equal(fused, plain)
    expected = (source.double() - mean.double().view(-1, 1, 1)) / std.double().view(-1, 1, 1)
    assert float((fused.double() - expected).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="out must be float32 of the source's shape"):
        normalise_uint8(source, torch.empty(2, 3, 9, 11), mean, std)
    with pytest.raises(ValueError, match="source must be uint8"):
        normalise_uint8(source.float(), torch.empty(3, 3, 9, 11), mean, std)
    # One value for every channel broadcasts on both paths; any other count is refused before the kernel.
    one = normalise_uint8(source, torch.empty(3, 3, 9, 11), [100.0], [50.0])
    assert torch.allclose(one, (source.float() - 100.0) / 50.0, atol=1e-6)
    monkeypatch.undo()
    assert torch.equal(normalise_uint8(source, torch.empty(3, 3, 9, 11), [100.0], [50.0]), one)
    with pytest.raises(ValueError, match="mean has 2 values for 3 channels"):
        normalise_uint8(source, torch.empty(3, 3, 9, 11), [1.0, 2.0], [50.0])
    with pytest.raises(ValueError, match="std must be positive"):
        normalise_uint8(source, torch.empty(3, 3, 9, 11), [1.0], [0.0, 1.0, 1.0])


@pytest.fixture
def photo_folder(tmp_path):
    """12 smooth JPEG 'photos' of different sizes in 3 classes."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(12):
        h, w = 40 + 7 * i, 90 - 3 * i
        coarse = torch.rand(1, 3, 4, 4, generator=g) * 255
        pixels = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")[0].permute(1, 2, 0)
        (tmp_path / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / f"c{i % 3}" / f"{i:02d}.jpg", quality=95)
    return tmp_path


def loader_for(root, cache, **options):
    base = dict(batch_size=5, image_size=32, seed=4, policy="threshold", threshold=0.4, peers="self")
    return GutoutLoader.from_folder(root, cache=cache, **(base | options))


def maps_cache(samples: int) -> SaliencyCache:
    cache = SaliencyCache(1, samples, (7, 7))
    cache.update(0, torch.arange(samples), torch.rand(samples, 7, 7, generator=torch.Generator().manual_seed(1)))
    cache.publish()
    return cache


def test_host_resize_matches_dalis_own(photo_folder):
    """Same windows, flips and pixels (up to the two resize implementations' rounding) as the all-DALI graph."""
    cache = maps_cache(12)
    host = list(loader_for(photo_folder, cache, policy="none").batches())
    dali = list(loader_for(photo_folder, cache, policy="none", cpu_resize="dali").batches())
    for a, b in zip(host, dali, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.windows, b.windows) and torch.equal(a.flips, b.flips)
        assert float((a.images - b.images).abs().mean()) < 0.02  # normalised units: ~1 grey level in 255
        assert float((a.images - b.images).abs().max()) < 0.3


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_fused_cut_gives_the_batches_of_normalising_then_cutting(photo_folder, kernel):
    """GutoutLoader fuses the cut into the host's normalising pass; the source + stage path, unfused, must
    give the same pixels, draws and statistics, epoch after epoch, with the batches held all along (and with
    the torch kernel, which cannot fuse, the same batches too)."""
    cache = maps_cache(12)
    loader = loader_for(photo_folder, cache, p=0.7, kernel=kernel)
    assert isinstance(loader.source, HostNormalisingSource)
    options = dict(policy="threshold", threshold=0.4, p=0.7, peers="self", kernel=kernel)
    stage = GutoutStage(StageConfig.from_flat(options), cache)
    for epoch in range(2):
        loader.set_epoch(epoch)
        fused = list(loader.batches())  # all held: a pool that reused a held batch would corrupt the earlier ones
        loader.source.set_epoch(epoch)
        generator = torch.Generator().manual_seed(loader.config.epoch_seed(epoch, salt=1))
        plain = [stage(b.images, b.indices, b.windows, b.flips, generator) for b in loader.source]
        assert len({b.images.data_ptr() for b in fused}) == len(fused)
        for f, p in zip(fused, plain, strict=True):
            assert torch.equal(f.images, p)
    assert abs(loader.stats.mean - stage.stats.mean) < 1e-9 and loader.stats.mean > 0


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_stage_normalise_and_cut_equals_both_unfused_paths(case):
    g = torch.Generator().manual_seed(2)
    B, H, W = 6, 20, 24
    source = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([120.0, 110.0, 100.0]), torch.tensor([60.0, 58.0, 57.0])
    cache = SaliencyCache(1, 10, (7, 7))
    cache.update(0, torch.arange(10), torch.rand(10, 7, 7, generator=g))
    cache.publish()
    indices, windows, flips = torch.arange(B), random_windows(B, g, pad=0.1), torch.rand(B, generator=g) < 0.5
    results = {}
    for name, kernel in (("fused", "auto"), ("numba", "numba"), ("torch", "torch")):
        stage = GutoutStage(StageConfig.from_flat(case | {"kernel": kernel, "peers": "self"}), cache)
        seeded = torch.Generator().manual_seed(3)
        if name == "fused":
            out = stage.normalise_and_cut(source, torch.empty(B, 3, H, W), mean, std, indices, windows, flips, seeded)
        else:
            normalised = normalise_uint8(source, torch.empty(B, 3, H, W), mean, std)
            out = stage(normalised, indices, windows, flips, seeded)
        results[name] = (out, stage.stats.mean)
    assert torch.equal(results["fused"][0], results["numba"][0])  # same arithmetic, same spans: identical
    assert results["fused"][1] == results["numba"][1]
    reference, _ = results["torch"]
    differ = (results["fused"][0] - reference).abs() > 1e-5  # normalisation rounding aside, only threshold ties
    assert int(differ.any(1).sum()) <= 4


def test_the_host_pass_leaves_dalis_threads_their_cores(photo_folder, monkeypatch):
    from gutout.pipelines.host_finish import HostFinish, host_thread_limit

    cores = len(os.sched_getaffinity(0))
    assert host_thread_limit(None, 2) == max(1, cores - 2) and host_thread_limit(None, cores + 4) == 1
    assert host_thread_limit(3, 2) == 3 and host_thread_limit(0, 2) is None  # 0: torch's own setting
    seen = []
    resize = HostFinish.resize
    monkeypatch.setattr(HostFinish, "resize", lambda self, *a: seen.append(torch.get_num_threads()) or resize(self, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # more threads than the bound leaves, whatever this machine's cores
    try:
        for host_threads, expected in [(None, min(4, max(1, cores - 2))), (1, 1), (0, 4)]:
            seen.clear()
            batches = list(loader_for(photo_folder, maps_cache(12), num_threads=2, host_threads=host_threads).batches())
            assert len(batches) == 3 and seen == [expected] * 3, (host_threads, seen)
            assert torch.get_num_threads() == 4  # restored between batches and after
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="host_threads=-1 must be >= 0"):
        loader_for(photo_folder, maps_cache(12), host_threads=-1)
