"""The fused CuPy kernel against the torch reference, pixel for pixel (CUDA only)."""

import pytest
import torch

from gutout import CutConfig
from gutout.cut import MODE_AREA, MODE_THRESHOLD, apply_plan_torch, plan_cuts, resolve_kernel
from gutout.kernels import why_unsupported
from gutout.warp import warp_to_crop
from tests.conftest import KERNEL_CASES, random_windows, requires_cuda


def test_cpu_tensors_never_get_the_cupy_kernel():
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64)  # a dtype no fused kernel takes
    assert resolve_kernel(x, CutConfig()) == "torch"
    assert "not CUDA" in why_unsupported(x)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cupy_kernel_matches_torch_reference(case, dtype, channels_last):
    pytest.importorskip("cupy")
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 32, 3, 56, 48
    images = (torch.randn(B, C, H, W, generator=g) + 5).to(device, dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    maps = torch.rand(B, 7, 7, generator=g).to(device)
    windows = random_windows(B, g, pad=0.2).to(device)
    flips = (torch.rand(B, generator=g) < 0.5).to(device)
    valid = (torch.rand(B, generator=g) < 0.8).to(device)
    cfg = CutConfig(**case)
    plan = plan_cuts(maps, valid, windows, flips, (H, W), cfg, torch.Generator().manual_seed(1))
    from gutout.kernels import apply_plan_cupy

    ref, ref_frac = apply_plan_torch(images.clone(), plan, maps, windows, flips, cfg.fill)
    out, frac = apply_plan_cupy(images.clone(), plan, maps, windows, flips, cfg.fill)
    torch.cuda.synchronize()
    differ = (out != ref).any(1)  # (B, H, W)
    sal = warp_to_crop(maps, windows, flips, (H, W))
    saliency_mode = ((plan.mode == MODE_THRESHOLD) | (plan.mode == MODE_AREA)).view(-1, 1, 1)
    ties = saliency_mode & ((sal - plan.tau.view(-1, 1, 1)).abs() < 1e-5)
    assert not bool((differ & ~ties).any()), f"{int((differ & ~ties).sum())} pixels differ off the threshold"
    assert int(differ.sum()) <= 4  # ties are rare
    assert (frac - ref_frac).abs().max() <= 4 / (H * W)
