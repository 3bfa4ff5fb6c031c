"""Every backend against the coordinate contract at sub-pixel precision (tests/contract.py says how the tolerance
is chosen): image folders through the torch and DALI backends (train, val, refresh views), and resized array
crops through the tensor, torch and DALI backends. Each test also shows that a half-pixel or an align-corners
mistake would fail it on the same images."""

import importlib.util

import pytest
import torch
from PIL import Image

from gutout.pipelines import ArrayDataset, LoaderConfig, make_source
from gutout.pipelines.datasets import scan_folder
from tests.contract import contract_errors, encoded_image, tolerance

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # the batches hold raw pixel values
# Small sources (<= 51 px: >= 5 values per px), upscaled to 48 px, and two large ones downscaled with
# antialiasing, where an align-corners mistake moves pixels by several px.
SIZES = [(30, 41), (51, 24), (40, 40), (45, 33), (26, 50), (200, 240), (240, 170)]


@pytest.fixture(scope="module")
def encoded_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoded")
    for i, (h, w) in enumerate(SIZES):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(encoded_image(h, w)).save(root / f"class{i % 2}" / f"{i:02d}.png")
    return scan_folder(root)


def source_hw(dataset, index):
    with Image.open(dataset.paths[index]) as image:
        return image.height, image.width


def check_views(batches, hw_of, uint8_view: bool, crop_first: bool) -> dict[str, float]:
    """Assert the contract on every image of `batches`; return, per mistake, the largest error over tolerance it
    would have caused (> 1 means the test catches that mistake)."""
    caught = {"half-pixel": 0.0, "align-corners": 0.0}
    for batch in batches:
        for image, index, window, flip in zip(batch.images, batch.indices, batch.windows, batch.flips, strict=True):
            hw = hw_of(int(index))
            out = tuple(image.shape[-2:])
            border = 1 if hw[0] > out[0] or hw[1] > out[1] else 0  # antialiasing is clamped at the crop's edge
            tol = tolerance(hw, uint8_view)
            errors = contract_errors(image.float(), window, bool(flip), hw, border, crop_first=crop_first)
            assert errors[0] <= tol[0] and errors[1] <= tol[1], (int(index), window.tolist(), errors, tol)
            for mistake in caught:
                wrong = contract_errors(image.float(), window, bool(flip), hw, border, mistake, crop_first)
                caught[mistake] = max(caught[mistake], wrong[0] / tol[0], wrong[1] / tol[1])
    return caught


def folder_backends():
    return ["torch"] + (["dali"] if HAS_DALI else [])


@pytest.mark.parametrize("backend", folder_backends())
@pytest.mark.parametrize("view", ["train", "val", "refresh"])
def test_image_folder_views_follow_the_contract(encoded_folder, backend, view):
    config = LoaderConfig(
        batch_size=4, image_size=48, seed=7, backend=backend, num_threads=0 if backend == "torch" else 1, **RAW
    )
    batches = []
    for epoch in range(3 if view == "train" else 1):
        source = make_source(encoded_folder, view, config)
        source.set_epoch(epoch)
        batches += list(source)
    # The torch backend and DALI's host-finished train crops resize uint8 images: a second rounding.
    caught = check_views(batches, lambda i: source_hw(encoded_folder, i), uint8_view=True, crop_first=view == "train")
    assert caught["half-pixel"] > 1 and caught["align-corners"] > 1, caught
    if view == "train":
        flips = torch.cat([b.flips for b in batches]).bool()
        assert bool(flips.any()) and not bool(flips.all())


def array_backends():
    return ["tensor", "torch"] + (["dali"] if HAS_DALI else [])


@pytest.mark.parametrize("backend", array_backends())
@pytest.mark.parametrize("view", ["train", "refresh"])
@pytest.mark.parametrize("image_size", [44, 9])  # up and down from 20 x 16
def test_resized_array_crops_follow_the_contract(backend, view, image_size):
    images = torch.from_numpy(encoded_image(20, 16))[None].repeat(6, 1, 1, 1)
    dataset = ArrayDataset(images, torch.arange(6) % 2, ("a", "b"), "encoded")
    config = LoaderConfig(batch_size=3, image_size=image_size, pad=3, seed=1, backend=backend, num_threads=0, **RAW)
    batches = []
    for epoch in range(4 if view == "train" else 1):
        source = make_source(dataset, view, config)
        source.set_epoch(epoch)
        batches += list(source)
    caught = check_views(batches, lambda i: (20, 16), uint8_view=backend != "tensor", crop_first=view == "train")
    assert caught["half-pixel"] > 1, caught
    if image_size < 20:  # the align-corners mistake moves pixels only where the scale changes much
        assert caught["align-corners"] > 1, caught
    if view == "train":
        assert bool(torch.cat([b.windows for b in batches])[:, :2].lt(0).any())  # crops reach into the padding
