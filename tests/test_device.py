"""The cut, the stage, the tensor backend, the drop-in loader and the trainer on the accelerator, each against the
same computation on the CPU. The device is `GUTOUT_TEST_DEVICE` (bench/gpu_check.sh sets it), else CUDA when
present, else the CPU, where these tests still check the wiring (device in, device out) at tiny sizes."""

import os

import pytest
import torch

from gutout import CutConfig, GutoutStage, SaliencyCache, StageConfig, cut
from gutout.pipelines import GutoutLoader
from gutout.train.models import small_resnet
from gutout.train.trainer import Trainer
from gutout.warp import warp_to_crop
from tests.conftest import KERNEL_CASES, fake_fashion_mnist, random_windows, small_run

DEVICE = torch.device(os.environ.get("GUTOUT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("GUTOUT_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)


def batch(B=16, C=3, H=40, W=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, C, H, W, generator=g) + 5
    maps = torch.rand(B, 7, 7, generator=g)
    windows = random_windows(B, g, pad=0.2)
    flips = torch.rand(B, generator=g) < 0.5
    valid = torch.rand(B, generator=g) < 0.8
    return images, maps, windows, flips, valid


def assert_same_cut(on_device, on_cpu, maps, windows, flips, threshold_policy: bool):
    """The device's batch erases what the CPU's does, except at float ties with a saliency threshold."""
    differ = (on_device.cpu().float() != on_cpu.float()).any(1)  # (B, H, W)
    if threshold_policy:
        sal = warp_to_crop(maps, windows, flips, tuple(on_cpu.shape[-2:]))
        differ &= sal.sub(0.5).abs() > 1e-4
    assert int(differ.sum()) == 0, int(differ.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cut_on_the_device_equals_the_cpu(case, dtype):
    if dtype == torch.float16 and DEVICE.type == "cpu":
        pytest.skip("float16 batches are a CUDA path")
    images, maps, windows, flips, valid = batch()
    cfg = CutConfig(**case)
    reference, _ = cut(
        images.to(dtype),
        maps,
        windows,
        flips,
        cfg,
        valid=valid,
        generator=torch.Generator().manual_seed(1),
        kernel="torch",
    )
    out, erased = cut(
        images.to(DEVICE, dtype),
        maps.to(DEVICE),
        windows.to(DEVICE),
        flips.to(DEVICE),
        cfg,
        valid=valid.to(DEVICE),
        generator=torch.Generator().manual_seed(1),
    )
    assert out.device.type == DEVICE.type and out.dtype == dtype and erased.device.type == DEVICE.type
    threshold = cfg.policy in ("threshold", "area")
    if threshold and cfg.policy == "area":  # area thresholds: ties only at each sample's own k-th value
        differ = (out.cpu().float() != reference.float()).any(1).sum()
        assert int(differ) <= len(images), int(differ)
    else:
        assert_same_cut(out, reference, maps, windows, flips, threshold)


def test_stage_with_a_device_cache_equals_the_cpu():
    images, _, windows, flips, _ = batch(B=12)
    caches = {}
    for device in ("cpu", DEVICE):
        cache = SaliencyCache(2, 12, (7, 7), device=device)
        g = torch.Generator().manual_seed(5)
        for m in range(2):
            cache.update(m, torch.arange(12), torch.rand(12, 7, 7, generator=g))
        cache.publish()
        caches[str(device)] = cache
    outs = {}
    for device, cache in caches.items():
        stage = GutoutStage(StageConfig(CutConfig(policy="threshold", threshold=0.5)), cache, member=0)
        outs[device] = stage(
            images.clone().to(device),
            torch.arange(12).to(device),
            windows.to(device),
            flips.to(device),
            torch.Generator().manual_seed(2),
        )
        assert outs[device].device.type == torch.device(device).type and stage.stats.samples == 12
    peers = caches["cpu"].maps.float()  # member 0 reads member 1's maps
    assert_same_cut(outs[str(DEVICE)], outs["cpu"], peers[1], windows, flips, threshold_policy=True)


def test_drop_in_loader_and_refresh_on_the_device():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 28, 28, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    results = {}
    for device in ("cpu", DEVICE):
        torch.manual_seed(0)
        model = small_resnet(10, 1).to(device)
        cache = SaliencyCache(1, 64, (7, 7), device=device)
        loader = GutoutLoader.from_arrays(
            images, labels, cache=cache, batch_size=16, policy="threshold", device=str(device), backend="tensor"
        )
        loader.refresh(model)
        assert bool(cache.valid.all()) and cache.maps.device.type == torch.device(device).type
        batches = list(loader)
        assert all(x.device.type == torch.device(device).type and y.device == x.device for x, y in batches)
        results[str(device)] = (cache.maps.float().cpu(), torch.cat([x.cpu() for x, _ in batches]))
    maps_cpu, batches_cpu = results["cpu"]
    maps_dev, batches_dev = results[str(DEVICE)]
    assert (maps_dev - maps_cpu).abs().max() < 5e-3  # float16 maps from two devices' convolutions
    same = (batches_dev == batches_cpu).float().mean()
    assert same > 0.99, float(same)  # the same crops, flips and cuts; a rare pixel flips at a threshold tie


def test_one_epoch_of_an_ensemble_on_the_device(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=256, n_test=64)
    cfg = small_run(
        data, tmp_path, ensemble=2, epochs=1, batch_size=64, device=DEVICE.type, backend="tensor", eval_batch_size=128
    )
    trainer = Trainer(cfg, log=lambda *a: None)
    final = trainer.run()
    assert trainer.device.type == DEVICE.type and trainer.amp == (DEVICE.type == "cuda")
    assert 0 <= final["test/ensemble/acc"] <= 1 and final["test/ensemble/nll"] == final["test/ensemble/nll"]
    assert 0 < final["gutout/erased_frac"] < 1
