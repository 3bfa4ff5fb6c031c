"""Backends (tensor, torch; dali also in test_dali.py) against the coordinate contract, and the drop-in loader."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from gutout import SaliencyCache
from gutout.config import ConfigError
from gutout.pipelines import ArrayDataset, DatasetError, GutoutLoader, LoaderConfig, make_source
from gutout.train.models import small_resnet

BACKENDS = ["tensor", "torch"]


def coordinate_images(N=6, H=12, W=10):
    """uint8 (N, H, W, 3): channel 0 encodes the row, channel 1 the column, channel 2 the sample index."""
    rows = torch.arange(H)[:, None].expand(H, W) * 20 + 10
    cols = torch.arange(W)[None, :].expand(H, W) * 20 + 10
    images = torch.stack([rows, cols, torch.zeros(H, W, dtype=torch.long)], -1)[None].repeat(N, 1, 1, 1)
    images[..., 2] = torch.arange(N)[:, None, None] * 10 + 5
    return images.to(torch.uint8)


def identity_config(**overrides):
    base = dict(batch_size=4, pad=3, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, num_threads=0, backend="tensor")
    return LoaderConfig(**(base | overrides))


def expected_pixels(window, flip, H, W):
    """What the contract says each output pixel shows: (row code, col code), 0 outside the image."""
    y0, x0, y1, x1 = window.tolist()
    i = torch.arange(H)
    j = torch.arange(W)
    j = W - 1 - j if flip else j
    src_r = torch.floor(y0 * H + (i + 0.5) / H * (y1 - y0) * H).long()  # source pixel under each centre
    src_c = torch.floor(x0 * W + (j + 0.5) / W * (x1 - x0) * W).long()
    inside = ((src_r >= 0) & (src_r < H))[:, None] & ((src_c >= 0) & (src_c < W))[None, :]
    rows = torch.where(inside, (src_r * 20 + 10)[:, None].expand(H, W), 0)
    cols = torch.where(inside, (src_c * 20 + 10)[None, :].expand(H, W), 0)
    return rows.float(), cols.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["train", "val", "refresh"])
def test_windows_and_flips_match_the_pixels(backend, view):
    images = coordinate_images()
    dataset = ArrayDataset(images, torch.arange(6) % 3, ("a", "b", "c"), "coords")
    source = make_source(dataset, view, identity_config(backend=backend))
    seen_flip = seen_pad = False
    for epoch in range(3):
        source.set_epoch(epoch)
        for batch in source:
            assert batch.images.shape[1:] == (3, 12, 10) and batch.images.dtype == torch.float32
            for b in range(len(batch.indices)):
                rows, cols = expected_pixels(batch.windows[b], bool(batch.flips[b]), 12, 10)
                assert torch.allclose(batch.images[b, 0], rows, atol=1e-3), (batch.windows[b], batch.flips[b])
                assert torch.allclose(batch.images[b, 1], cols, atol=1e-3), (batch.windows[b], batch.flips[b])
                index = int(batch.indices[b])
                assert abs(float(batch.images[b, 2].max()) - (index * 10 + 5)) < 1e-3  # the right sample
                assert int(batch.labels[b]) == index % 3
            seen_flip |= bool(batch.flips.any())
            seen_pad |= bool((batch.windows[:, :2] < 0).any())
    if view == "train":
        assert seen_flip and seen_pad
    else:
        assert not seen_flip and torch.equal(batch.windows[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sample_once_per_epoch_reproducible_and_sharded(backend):
    dataset = ArrayDataset(coordinate_images(N=11), torch.zeros(11), ("a",), "x")
    orders = []
    for epoch in (0, 1, 0):
        source = make_source(dataset, "train", identity_config(backend=backend))
        source.set_epoch(epoch)
        indices = torch.cat([b.indices for b in source])
        assert sorted(indices.tolist()) == list(range(11)) and len(source) == 3
        orders.append(indices.tolist())
    assert orders[0] == orders[2] and orders[0] != orders[1]
    shards = [
        torch.cat(
            [b.indices for b in make_source(dataset, "val", identity_config(backend=backend, shard_id=s, num_shards=3))]
        )
        for s in range(3)
    ]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))
    assert [len(s) for s in shards] == [3, 4, 4]


def test_backends_agree_on_val_and_refresh():
    dataset = ArrayDataset(coordinate_images(N=5), torch.arange(5), tuple("abcde"), "x")
    backends = BACKENDS + (["dali"] if importlib.util.find_spec("nvidia.dali") else [])
    for view in ("val", "refresh"):
        batches = [list(make_source(dataset, view, identity_config(backend=b))) for b in backends]
        for others in batches[1:]:
            for a, b in zip(batches[0], others, strict=True):
                assert torch.allclose(a.images, b.images, atol=1e-3) and torch.equal(a.indices, b.indices)
                assert torch.equal(a.windows, b.windows) and torch.equal(a.flips.bool(), b.flips.bool())
                assert torch.equal(a.labels, b.labels)


def test_resized_output_keeps_the_window():
    dataset = ArrayDataset(coordinate_images(N=2), torch.arange(2), ("a", "b"), "x")
    batch = next(iter(make_source(dataset, "refresh", identity_config(image_size=24))))
    assert batch.images.shape[-2:] == (24, 24) and torch.equal(batch.windows[0], torch.tensor([0.0, 0, 1, 1]))


def filled_cache(N, K=1, salient_left=True):
    cache = SaliencyCache(K, N, (4, 4))
    maps = torch.zeros(N, 4, 4)
    maps[:, :, :2] = 1.0 if salient_left else 0.0
    for k in range(K):
        cache.update(k, torch.arange(N), maps)
    cache.publish()
    return cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_cuts_with_the_cache_and_yields_dataloader_pairs(backend):
    images = torch.full((8, 16, 16, 1), 200, dtype=torch.uint8)
    cache = filled_cache(8)
    loader = GutoutLoader.from_arrays(
        images,
        torch.arange(8) % 2,
        cache=cache,
        batch_size=4,
        pad=0,
        flip=False,
        policy="threshold",
        threshold=0.5,
        fill=-9.0,
        backend=backend,
        num_threads=0,
    )
    assert len(loader) == 2
    pairs = list(loader)
    assert len(pairs) == 2
    for images_out, labels in pairs:
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert bool((images_out[:, :, :, :8] == -9.0).all()) and bool((images_out[:, :, :, 8:] != -9.0).all())
    assert abs(loader.stats.mean - 0.5) < 1e-6
    record = next(loader.batches())
    assert record.indices.shape == (4,) and record.windows.shape == (4, 4) and record.flips.dtype == torch.bool


def test_foreign_training_loop_runs_unchanged():
    """A loop written for torch.utils.data.DataLoader: only the loader line changes."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 12, 12, 1, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 3, (64,), generator=g)
    cache = SaliencyCache(1, 64, (3, 3))

    def train_one_epoch(model, loader, opt):  # the user's code, untouched
        model.train()
        seen = 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        return seen

    model = small_resnet(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = GutoutLoader.from_arrays(images, labels, cache=cache, batch_size=16, policy="threshold", backend="tensor")
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert train_one_epoch(model, loader, opt) == 64
        loader.refresh(model)  # one line per epoch: this member's Grad-CAM into the cache
    assert bool(cache.valid.all()) and cache.epoch == 1 and cache.layer == "layer3"
    assert loader.stats.mean > 0


def test_refresh_writes_canonical_gradcam_maps():
    images = (torch.rand(10, 28, 28, 1) * 255).to(torch.uint8)
    cache = SaliencyCache(2, 10, (7, 7))
    loader = GutoutLoader.from_arrays(
        images, torch.arange(10) % 10, cache=cache, member=1, batch_size=4, backend="tensor", policy="threshold"
    )
    model = small_resnet(10, 1).eval()
    loader.refresh(model)
    from gutout import GradCAM

    expected = GradCAM(model, "layer3")(next(iter(loader.view("refresh", 10))).images, torch.arange(10) % 10)
    assert bool(cache.valid[1].all()) and not bool(cache.valid[0].any())
    assert (cache.maps[1].float() - expected).abs().max() < 1e-3  # float16 storage


def test_bad_options_and_mismatched_cache():
    images = torch.zeros(4, 8, 8, 1, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="unknown GutoutLoader option 'treshold'"):
        GutoutLoader.from_arrays(images, torch.zeros(4), treshold=0.5)
    with pytest.raises(ConfigError, match="backend='jax'"):
        GutoutLoader.from_arrays(images, torch.zeros(4), backend="jax")
    with pytest.raises(DatasetError, match="cache holds 5 samples but arrays has 4"):
        GutoutLoader.from_arrays(images, torch.zeros(4), cache=SaliencyCache(1, 5), backend="tensor")
    other = SaliencyCache(1, 4)
    other.fingerprint = "n=4:deadbeef"
    with pytest.raises(DatasetError, match="cache was built for dataset n=4:deadbeef, but arrays is n=4:"):
        GutoutLoader.from_arrays(images, torch.zeros(4), cache=other, backend="tensor")
    with pytest.raises(ValueError, match="needs a SaliencyCache"):
        GutoutLoader.from_arrays(images, torch.zeros(4), policy="threshold", backend="tensor")
    with pytest.raises(DatasetError, match="tensor backend holds the dataset in memory"):
        from gutout.pipelines.datasets import FolderDataset

        make_source(FolderDataset(None, [], torch.zeros(0), ()), "train", LoaderConfig(backend="tensor"))


def test_refresh_through_a_head_that_needs_gradients():
    """A head that is not GAP + linear: refresh takes Grad-CAM's gradient path."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 3))

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    images = (torch.rand(6, 8, 8, 1) * 255).to(torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cache = SaliencyCache(1, 6, (8, 8))
    loader = GutoutLoader.from_arrays(images, labels, cache=cache, batch_size=3, backend="tensor", policy="threshold")
    model = Net()
    loader.refresh(model, "body")
    from gutout import GradCAM

    expected = GradCAM(model, "body")(next(iter(loader.view("refresh", 6))).images, labels)
    assert bool(cache.valid.all()) and (cache.maps[0].float() - expected).abs().max() < 1e-3
