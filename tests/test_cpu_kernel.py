"""The fused CPU kernel (Numba) against the torch reference, pixel for pixel, and how `auto` picks it."""

import pytest
import torch

from gutout import CutConfig, GutoutStage, SaliencyCache, StageConfig, cpu_kernel, cut
from gutout.cut import MODE_AREA, MODE_THRESHOLD, apply_plan_torch, plan_cuts, resolve_kernel
from gutout.warp import warp_to_crop
from tests.conftest import KERNEL_CASES, random_windows

pytest.importorskip("numba")


def both_paths(case, shape=(24, 3, 56, 48), map_size=(7, 7), channels_last=False, pad=0.2, seed=0):
    """(reference, fused, reference erased, fused erased, ties (B, H, W)) for one random batch and plan."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    images = torch.randn(B, C, H, W, generator=g) + 5
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    maps = torch.rand(B, *map_size, generator=g)
    windows = random_windows(B, g, pad=pad)
    flips = torch.rand(B, generator=g) < 0.5
    valid = torch.rand(B, generator=g) < 0.8
    cfg = CutConfig(**case)

    def plan():  # the torch path consumes the plan's saliency buffer, so each path gets its own plan
        return plan_cuts(maps, valid, windows, flips, (H, W), cfg, torch.Generator().manual_seed(1))

    ref, ref_erased = apply_plan_torch(images.clone(), plan(), maps, windows, flips, cfg.fill)
    fused_plan = plan()
    out, erased = cpu_kernel.apply_plan_numba(images.clone(), fused_plan, maps, windows, flips, cfg.fill)
    saliency = warp_to_crop(maps, windows, flips, (H, W))
    by_saliency = ((fused_plan.mode == MODE_THRESHOLD) | (fused_plan.mode == MODE_AREA)).view(-1, 1, 1)
    ties = by_saliency & ((saliency - fused_plan.tau.view(-1, 1, 1)).abs() < 1e-5)
    return ref, out, ref_erased, erased, ties


def assert_same_cut(ref, out, ref_erased, erased, ties):
    differ = (out != ref).any(1)  # (B, H, W)
    assert not bool((differ & ~ties).any()), f"{int((differ & ~ties).sum())} pixels differ off the threshold"
    assert int(differ.sum()) <= 4  # float rounding at a threshold: rare
    H, W = ref.shape[-2:]
    assert float((erased - ref_erased).abs().max()) <= 4 / (H * W)
    assert out.stride() == ref.stride()  # in place: the layout is kept


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_numba_kernel_matches_torch_reference(case, channels_last):
    assert_same_cut(*both_paths(case, channels_last=channels_last))


@pytest.mark.parametrize("map_size", [(1, 1), (3, 5), (14, 14)])
@pytest.mark.parametrize("hw", [(1, 5), (7, 9), (224, 224)])
@pytest.mark.parametrize("case", KERNEL_CASES[:3] + KERNEL_CASES[6:7], ids=["t0.5", "t0", "area", "noise"])
def test_numba_kernel_on_odd_shapes(case, hw, map_size):
    """Maps smaller and larger than the crop, one-row crops, crops reaching into the padding."""
    assert_same_cut(*both_paths(case, shape=(6, 3, *hw), map_size=map_size, pad=0.3, seed=hw[0]))


def test_spans_are_exact_at_bench_scale():
    """Large crops of smooth maps, where most of the erased area is decided a segment at a time."""
    for seed in range(3):
        assert_same_cut(*both_paths(dict(policy="threshold", threshold=0.5), shape=(16, 3, 224, 224), seed=seed))


def test_auto_picks_numba_for_float32_cpu_batches_and_the_reference_otherwise(monkeypatch):
    images = torch.zeros(2, 3, 8, 8)
    assert resolve_kernel(images, CutConfig()) == "numba"
    assert resolve_kernel(images.double(), CutConfig()) == "torch"
    assert resolve_kernel(images[:, :, ::2], CutConfig()) == "torch"  # strided: neither NCHW nor channels-last
    assert resolve_kernel(images, CutConfig(kernel="torch")) == "torch"
    with pytest.raises(ValueError, match="kernel 'numba' cannot run here.*float32"):
        resolve_kernel(images.double(), CutConfig(kernel="numba"))
    monkeypatch.setattr(cpu_kernel, "_numba", lambda: None)  # as on a machine without Numba
    assert resolve_kernel(images, CutConfig()) == "torch"
    with pytest.raises(ValueError, match="Numba is not installed"):
        resolve_kernel(images, CutConfig(kernel="numba"))


def test_stage_gives_the_same_batches_and_statistics_with_either_kernel():
    g = torch.Generator().manual_seed(3)
    cache = SaliencyCache(1, 50, (7, 7))
    cache.update(0, torch.arange(50), torch.rand(50, 7, 7, generator=g))
    cache.publish()
    images = torch.randn(16, 3, 40, 40, generator=g)
    indices = torch.randperm(50, generator=g)[:16]
    windows, flips = random_windows(16, g), torch.rand(16, generator=g) < 0.5
    results = {}
    for kernel in ("torch", "numba"):
        stage = GutoutStage(StageConfig.from_flat(policy="threshold", p=0.7, kernel=kernel, peers="self"), cache)
        out = stage(images.clone(), indices, windows, flips, torch.Generator().manual_seed(5))
        results[kernel] = (out, stage.stats.mean)
    (ref, ref_mean), (out, mean) = results["torch"], results["numba"]
    assert int((out != ref).any(1).sum()) <= 2 and abs(mean - ref_mean) <= 2 / (16 * 40 * 40)
    assert bool((out != images).any())  # it did cut


def test_cut_entry_point_runs_the_fused_kernel_in_place():
    g = torch.Generator().manual_seed(4)
    images = torch.randn(4, 3, 32, 32, generator=g)
    maps, windows, flips = torch.rand(4, 7, 7, generator=g), random_windows(4, g), torch.zeros(4, dtype=torch.bool)
    out, erased = cut(images, maps, windows, flips, threshold=0.3, inplace=True, kernel="numba")
    assert out.data_ptr() == images.data_ptr()
    assert torch.allclose(erased, (out == 0).all(1).float().mean((1, 2)))


def test_views_into_a_larger_batch_are_cut_in_place_and_alone():
    """A batch that is a slice of a bigger one (a storage offset): only its own pixels change."""
    g = torch.Generator().manual_seed(6)
    whole = torch.randn(6, 3, 16, 16, generator=g) + 5
    before = whole.clone()
    part = whole[2:5]  # contiguous, storage offset 2 samples in
    maps, windows = torch.rand(3, 7, 7, generator=g), random_windows(3, g)
    ref, _ = cut(part.clone(), maps, windows, torch.zeros(3, dtype=torch.bool), threshold=0.2, kernel="torch")
    cut(part, maps, windows, torch.zeros(3, dtype=torch.bool), threshold=0.2, inplace=True, kernel="numba")
    assert torch.equal(whole[:2], before[:2]) and torch.equal(whole[5:], before[5:])
    assert int((whole[2:5] != ref).any(1).sum()) <= 2


def test_tensors_that_track_gradients_take_the_reference():
    """The kernel writes through NumPy, outside autograd: such batches go to torch, which records the write."""
    g = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    maps, windows, flips = torch.rand(2, 7, 7, generator=g), random_windows(2, g), torch.zeros(2, dtype=torch.bool)
    assert resolve_kernel(images, CutConfig()) == "torch"
    out, _ = cut(images, maps, windows, flips, threshold=0.3)
    out.sum().backward()  # the reference's cut is differentiable
    assert images.grad is not None
    with torch.no_grad():
        assert resolve_kernel(images, CutConfig()) == "numba"
    version = images.detach()._version
    with torch.no_grad():
        cut(images.detach(), maps, windows, flips, threshold=0.3, inplace=True, kernel="numba")
    assert images.detach()._version > version  # an in-place write autograd can see
