"""The DALI backend against the coordinate contract (docs/design.md), epoch coverage, sharding and bad input.

Images encode their own coordinates (red = source row, green = source column), so every output pixel says
which source point it came from, and a wrong window or flip cannot pass. PNG keeps the values exact.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from gutout.config import ConfigError  # noqa: E402
from gutout.pipelines.batch import LoaderConfig, shard_range  # noqa: E402
from gutout.pipelines.dali import dali_array_source, dali_folder_source  # noqa: E402
from gutout.pipelines.datasets import STATS, ArrayDataset, DatasetError, scan_folder  # noqa: E402

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
ROOT = Path(__file__).resolve().parents[1]


def coordinate_image(height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: red = row, green = column, blue = 200 (H, W <= 256)."""
    image = np.full((height, width, 3), 200, dtype=np.uint8)
    image[..., 0] = np.arange(height)[:, None]
    image[..., 1] = np.arange(width)[None, :]
    return image


@pytest.fixture(scope="module")
def coord_folder(tmp_path_factory):
    """3 classes, 8 PNGs: small ones (upscaled to 48 px: plain bilinear) and large ones (downscaled: antialiased)."""
    root = tmp_path_factory.mktemp("coords")
    sizes = [(30, 41), (57, 24), (40, 40), (180, 240), (33, 70), (250, 150), (26, 52), (61, 35)]
    for i, (h, w) in enumerate(sizes):
        (root / f"class{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(coordinate_image(h, w)).save(root / f"class{i % 3}" / f"{i:02d}.png")
    return scan_folder(root)


def denormalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, C, H, W) normalised -> raw pixel values in [0, 255]."""
    mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(std).view(1, -1, 1, 1) * 255
    return images.float() * std + mean


def contract_coordinates(window: torch.Tensor, flip: bool, out_hw, src_hw):
    """Source-pixel coordinates (row (H,), column (W,)) that output pixels must show, per docs/design.md,
    and the masks of those inside the source image."""
    (H, W), (h, w) = out_hw, src_hw
    y0, x0, y1, x1 = window.double().tolist()
    v = y0 + (torch.arange(H, dtype=torch.float64) + 0.5) / H * (y1 - y0)  # canonical row of each output row
    u = x0 + (torch.arange(W, dtype=torch.float64) + 0.5) / W * (x1 - x0)
    if flip:
        u = u.flip(0)  # output column j shows crop column W - 1 - j
    return v * h - 0.5, u * w - 0.5, (v >= 0) & (v <= 1), (u >= 0) & (u <= 1)


def assert_follows_contract(raw: torch.Tensor, window, flip, src_hw, border: int, tol: float = 0.75):
    """raw (3, H, W) pixel values of an encoded image against the window/flip mapping, `border` px excluded."""
    H, W = raw.shape[-2:]
    rows, cols, _, _ = contract_coordinates(window, flip, (H, W), src_hw)
    rows = rows.clamp(0, src_hw[0] - 1)  # bilinear sampling clamps to the edge inside the image
    cols = cols.clamp(0, src_hw[1] - 1)
    inner = (slice(border, H - border), slice(border, W - border))
    err_r = (raw[0] - rows[:, None].float())[inner].abs().max()
    err_c = (raw[1] - cols[None, :].float())[inner].abs().max()
    assert err_r <= tol and err_c <= tol, f"window {window.tolist()} flip {bool(flip)}: errors {err_r}, {err_c}"


def source_hw(dataset, index: int) -> tuple[int, int]:
    with Image.open(dataset.paths[index]) as image:
        return image.height, image.width


@pytest.fixture
def no_hang():
    """Turn a hang into a failure: DALI errors must surface, not stall the loop."""

    def on_alarm(signum, frame):
        raise TimeoutError("the DALI source hung")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# -- windows and flips ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "view, cpu_resize", [("train", "torch"), ("train", "dali"), ("val", "torch"), ("refresh", "torch")]
)
def test_folder_views_follow_the_window_contract(coord_folder, view, cpu_resize):
    """`cpu_resize`: the CPU train crop resized on the host (torch) or by DALI; both honour the contract."""
    config = LoaderConfig(batch_size=3, image_size=48, mean=MEAN, std=STD, seed=3, cpu_resize=cpu_resize)
    flips = []
    for epoch in range(2 if view == "train" else 1):
        source = dali_folder_source(coord_folder, view, config)
        source.set_epoch(epoch)
        for batch in source:
            assert batch.images.shape[1:] == (3, 48, 48) and batch.images.dtype == torch.float32
            raw = denormalise(batch.images, MEAN, STD)
            assert torch.allclose(raw[:, 2], torch.tensor(200.0), atol=0.6)  # normalisation is per channel
            for image, index, window, flip in zip(raw, batch.indices, batch.windows, batch.flips, strict=True):
                hw = source_hw(coord_folder, int(index))
                # Downscaling antialiases over one output pixel; at the crop's edge that filter is clamped.
                border = 1 if min(hw) > 48 else 0
                assert_follows_contract(image, window, bool(flip), hw, border)
            flips.append(batch.flips)
    flips = torch.cat(flips)
    if view == "train":
        assert bool(flips.any()) and not bool(flips.all()), "train must flip some samples and not others"
    else:
        assert not bool(flips.any())


def test_folder_windows_are_what_each_view_promises(coord_folder):
    config = LoaderConfig(batch_size=4, image_size=48, seed=5)
    train = torch.cat([b.windows for b in dali_folder_source(coord_folder, "train", config)])
    assert bool((train[:, :2] >= 0).all() and (train[:, 2:] <= 1).all() and (train[:, 2:] > train[:, :2]).all())
    area = (train[:, 2] - train[:, 0]) * (train[:, 3] - train[:, 1])
    assert float(area.max()) <= 1.0 and float(area.min()) > 0.08 * 0.5  # area range, up to aspect clipping
    refresh = torch.cat([b.windows for b in dali_folder_source(coord_folder, "refresh", config)])
    assert torch.equal(refresh, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(coord_folder), 4))
    val = torch.cat([b.windows for b in dali_folder_source(coord_folder, "val", config)])
    torch.testing.assert_close(val[:, :2] + val[:, 2:], torch.ones(len(coord_folder), 2))  # centred
    hw = torch.tensor([source_hw(coord_folder, i) for i in range(len(coord_folder))], dtype=torch.float32)
    side = hw.min(1).values / config.val_resize  # the square's side in source pixels
    torch.testing.assert_close((val[:, 2:] - val[:, :2]) * hw, side[:, None].expand(-1, 2))


def array_dataset(n=10, height=9, width=11, name="toy"):
    images = torch.full((n, height, width, 3), 200, dtype=torch.uint8)
    images[..., 0] = torch.arange(height)[:, None] + 1  # + 1: a 0 can only be padding
    images[..., 1] = torch.arange(width)[None, :] + 1
    return ArrayDataset(images, torch.arange(n) % 4, ("a", "b", "c", "d"), name)


def test_array_train_pads_crops_and_flips_by_its_windows():
    dataset = array_dataset()
    config = LoaderConfig(batch_size=4, pad=3, mean=MEAN, std=STD, seed=1)
    batches = list(dali_array_source(dataset, "train", config))
    windows = torch.cat([b.windows for b in batches])
    assert float(windows.min()) < 0 and float(windows.max()) > 1, "pad windows must reach outside [0, 1]"
    torch.testing.assert_close(windows[:, 2:] - windows[:, :2], torch.ones(len(dataset), 2))
    flips = torch.cat([b.flips for b in batches])
    assert bool(flips.any()) and not bool(flips.all())
    for batch in batches:
        raw = denormalise(batch.images, MEAN, STD)
        for image, window, flip in zip(raw, batch.windows, batch.flips, strict=True):
            rows, cols, row_in, col_in = contract_coordinates(window, bool(flip), (9, 11), (9, 11))
            inside = row_in[:, None] & col_in[None, :]  # (9, 11)
            expected = torch.stack([rows[:, None] + 1 + 0 * cols, 0 * rows[:, None] + cols + 1])  # (2, 9, 11)
            assert torch.allclose(image[:2][:, inside], expected.float()[:, inside], atol=1e-3)
            assert torch.allclose(image[2][inside], torch.tensor(200.0), atol=1e-3)
            assert torch.allclose(image[:, ~inside], torch.tensor(0.0), atol=1e-3), "padding must be zeros"


def test_array_grayscale_train_with_padding():
    h, w = 12, 15
    images = (1 + torch.arange(h)[:, None] * 16 + torch.arange(w)[None, :]).to(torch.uint8).expand(6, h, w)
    dataset = ArrayDataset(images.contiguous(), torch.zeros(6), ("x",), "fashion-mnist/train")
    config = LoaderConfig(batch_size=4, pad=2, seed=2)
    mean, std = STATS["fashion-mnist"]
    for batch in dali_array_source(dataset, "train", config):
        assert batch.images.shape[1:] == (1, h, w)
        raw = denormalise(batch.images, mean, std)[:, 0]
        for image, window, flip in zip(raw, batch.windows, batch.flips, strict=True):
            rows, cols, row_in, col_in = contract_coordinates(window, bool(flip), (h, w), (h, w))
            expected = torch.where(row_in[:, None] & col_in[None, :], 1 + rows[:, None] * 16 + cols[None, :], 0)
            torch.testing.assert_close(image, expected.float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("view", ["val", "refresh"])
def test_array_eval_views_are_the_identity(view):
    dataset = array_dataset()
    config = LoaderConfig(batch_size=4, mean=MEAN, std=STD)
    images = torch.cat([b.images for b in dali_array_source(dataset, view, config)])
    expected = dataset.images.permute(0, 3, 1, 2).float()
    torch.testing.assert_close(denormalise(images, MEAN, STD), expected, atol=1e-3, rtol=0)
    batch = next(iter(dali_array_source(dataset, view, config)))
    assert torch.equal(batch.windows, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4))
    assert not bool(batch.flips.any())


def test_array_refresh_squashes_to_image_size():
    dataset = array_dataset()
    config = LoaderConfig(batch_size=4, image_size=20, mean=MEAN, std=STD)
    for batch in dali_array_source(dataset, "refresh", config):
        raw = denormalise(batch.images, MEAN, STD) - torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1)  # undo + 1
        for image, window in zip(raw, batch.windows, strict=True):
            assert_follows_contract(image, window, False, (9, 11), border=0)


# -- epochs, shards, labels -----------------------------------------------------------------------------


def epoch_of(source, epoch):
    source.set_epoch(epoch)
    batches = list(source)
    assert len(batches) == len(source)
    return batches


@pytest.mark.parametrize("kind", ["folder", "arrays"])
def test_each_shard_covers_its_samples_once_per_epoch(coord_folder, kind):
    dataset = coord_folder if kind == "folder" else array_dataset(n=11)
    make = dali_folder_source if kind == "folder" else dali_array_source
    N, B = len(dataset), 3
    seen = []
    for shard in range(3):
        config = LoaderConfig(batch_size=B, image_size=16, num_shards=3, shard_id=shard, seed=7)
        start, stop = shard_range(N, shard, 3)
        for view in ("train", "val", "refresh"):
            for epoch in (0, 1):
                batches = epoch_of(make(dataset, view, config), epoch)
                sizes = [len(b.indices) for b in batches]
                assert sizes == [B] * (len(sizes) - 1) + [(stop - start) - B * (len(sizes) - 1)]
                assert len(batches) == -(-(stop - start) // B)
                indices = torch.cat([b.indices for b in batches])
                assert indices.dtype == torch.int64 and sorted(indices.tolist()) == list(range(start, stop))
                if view != "train":
                    assert indices.tolist() == list(range(start, stop)), "eval views keep the dataset order"
                for b in batches:
                    assert b.labels.dtype == torch.int64 and torch.equal(b.labels, dataset.labels[b.indices])
                    assert b.windows.dtype == torch.float32 and b.flips.dtype == torch.bool
                    assert b.windows.shape == (len(b.indices), 4) and b.images.shape[0] == len(b.indices)
            seen.append(indices)
    assert sorted(torch.cat(seen[::3]).tolist()) == list(range(N)), "shards are disjoint and complete"


@pytest.mark.parametrize("kind", ["folder", "arrays"])
def test_train_epochs_are_shuffled_and_reproducible(coord_folder, kind):
    dataset = coord_folder if kind == "folder" else array_dataset(n=12)
    make = dali_folder_source if kind == "folder" else dali_array_source
    config = LoaderConfig(batch_size=5, image_size=16, seed=11)
    first = make(dataset, "train", config)
    epoch0, epoch1 = epoch_of(first, 0), epoch_of(first, 1)
    order0, order1 = (torch.cat([b.indices for b in e]) for e in (epoch0, epoch1))
    assert not torch.equal(order0, order1), "two epochs must differ in order"
    flips0, flips1 = (torch.cat([b.flips for b in e]) for e in (epoch0, epoch1))
    assert not torch.equal(flips0, flips1), "augmentation draws must change with the epoch, not just the order"
    again = epoch_of(make(dataset, "train", config), 1)  # a fresh source, straight to epoch 1 (a resume)
    for a, b in zip(epoch1, again, strict=True):
        for field_a, field_b in zip(a, b, strict=True):
            assert (field_a is None and field_b is None) or torch.equal(field_a, field_b)
    other_seed = epoch_of(make(dataset, "train", LoaderConfig(batch_size=5, image_size=16, seed=12)), 1)
    assert not torch.equal(torch.cat([b.windows for b in other_seed]), torch.cat([b.windows for b in epoch1]))


def test_leaving_an_epoch_early_does_not_disturb_the_next(coord_folder, no_hang):
    source = dali_folder_source(coord_folder, "val", LoaderConfig(batch_size=3, image_size=16))
    for _ in source:
        break  # the pipeline still has batches in flight
    assert torch.cat([b.indices for b in source]).tolist() == list(range(len(coord_folder)))


def test_more_shards_than_samples_gives_an_empty_epoch():
    config = LoaderConfig(batch_size=2, num_shards=4, shard_id=0)
    source = dali_array_source(array_dataset(n=3), "train", config)
    assert len(source) == 0 and list(source) == []


# -- configuration --------------------------------------------------------------------------------------


def test_statistics_and_devices():
    folder_like = array_dataset(name="cifar10/train")
    source = dali_array_source(folder_like, "val", LoaderConfig())
    assert (tuple(source.mean), tuple(source.std)) == STATS["cifar10"]  # the same rule as every backend
    with pytest.raises(ConfigError, match="dali backend runs on 'cpu' or 'cuda'"):
        dali_array_source(array_dataset(), "train", LoaderConfig(device="meta"))
    with pytest.raises(ConfigError, match="view"):
        dali_array_source(array_dataset(), "test", LoaderConfig())
    # float16 is for GPU pipelines; on the CPU the images stay float32
    batch = next(iter(dali_array_source(array_dataset(), "val", LoaderConfig(batch_size=2, half=True))))
    assert batch.images.dtype == torch.float32 and batch.images.device.type == "cpu"


@pytest.mark.parametrize("view", ["train", "val", "refresh"])
def test_gpu_graphs_are_well_formed_without_a_gpu(view):
    """The CUDA branch (mixed decoding, float16) cannot run here; defining its graph still catches mistakes
    in it. `_build_graph` is DALI's own graph step before the backend (which needs CUDA) starts."""
    from nvidia.dali import types

    from gutout.pipelines.dali import array_pipeline, folder_pipeline

    common = dict(mean=[0.5] * 3, std=[0.2] * 3, dtype=types.FLOAT16, batch_size=2, num_threads=1, device_id=0)
    folder = folder_pipeline(
        files=["x.jpg"],
        indices=[0],
        view=view,
        image_size=32,
        crop_area=(0.08, 1.0),
        crop_ratio=(0.75, 1.33),
        crop_fraction=0.875 if view == "val" else None,
        flip=True,
        decode_device="mixed",
        **common,
    )
    arrays = array_pipeline(
        source=lambda: iter(()), view=view, height=4, width=4, out_size=(8, 8), on_gpu=True, **common
    )
    for pipe in (folder, arrays):
        if not hasattr(pipe, "_build_graph"):
            pytest.skip("this DALI has no _build_graph")
        pipe._build_graph()
    devices = [node.device for node in folder._graph_outputs]
    assert devices[0] == "gpu" and set(devices[1:]) == {"cpu"}, "images on the GPU, indices/windows/flips on the CPU"
    assert [node.device for node in arrays._graph_outputs] == ["gpu"]


def test_module_imports_without_touching_dali():
    code = "import sys, gutout.pipelines.dali; assert 'nvidia.dali' not in sys.modules, 'imported DALI'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ""})


# -- bad input ------------------------------------------------------------------------------------------


@pytest.fixture
def jpeg_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"c{i % 2}" / f"{i:02d}.jpg", quality=90)
    return tmp_path


BAD_CONTENT = {
    "truncated": lambda good: good[: len(good) // 2],
    "not-an-image": lambda good: b"this is a text file, not a JPEG\n" * 4,
}


@pytest.mark.parametrize("damage", sorted(BAD_CONTENT))
@pytest.mark.parametrize("view", ["train", "val"])
def test_a_bad_file_mid_epoch_is_one_clear_error(jpeg_folder, damage, view, no_hang):
    bad = jpeg_folder / "c1" / "03.jpg"  # index 6 of 10: mid-epoch
    bad.write_bytes(BAD_CONTENT[damage](bad.read_bytes()))
    # Batch 4: the bad file is third in its batch, so naming the batch's first file would not pass.
    source = dali_folder_source(scan_folder(jpeg_folder), view, LoaderConfig(batch_size=4, image_size=16))
    delivered = 0
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        for batch in source:
            delivered += len(batch.indices)
    assert delivered < 10


def test_a_file_deleted_after_the_scan_is_named(jpeg_folder, no_hang):
    dataset = scan_folder(jpeg_folder)
    gone = jpeg_folder / "c0" / "04.jpg"
    gone.unlink()
    with pytest.raises(DatasetError, match=re.escape(str(gone))):
        list(dali_folder_source(dataset, "train", LoaderConfig(batch_size=3, image_size=16)))
