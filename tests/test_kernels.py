"""The fused CUDA kernel against the torch reference, pixel for pixel: on a GPU through CuPy, and everywhere as
the same source built as host C++ (tests/cuda_host.py); nvcc compiles it wherever nvcc exists."""

import shutil
import subprocess

import pytest
import torch

from gutout import CutConfig
from gutout.cut import MODE_AREA, MODE_THRESHOLD, apply_plan_torch, plan_cuts, resolve_kernel
from gutout.kernels import SOURCE, why_unsupported
from gutout.warp import warp_to_crop
from tests import cuda_host
from tests.conftest import KERNEL_CASES, random_windows, requires_cuda

CASE_IDS = lambda c: "-".join(f"{k}={v}" for k, v in c.items())  # noqa: E731


def test_cpu_tensors_never_get_the_cupy_kernel():
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64)  # a dtype no fused kernel takes
    assert resolve_kernel(x, CutConfig()) == "torch"
    assert "not CUDA" in why_unsupported(x)


def kernel_inputs(case, dtype, channels_last, device, shape=(32, 3, 56, 48), seed=0):
    """A batch, its maps (some invalid), windows reaching into the padding, flips, and the plan for `case`."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    images = (torch.randn(B, C, H, W, generator=g) + 5).to(device, dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    maps = torch.rand(B, 7, 7, generator=g).to(device)
    windows = random_windows(B, g, pad=0.2).to(device)
    flips = (torch.rand(B, generator=g) < 0.5).to(device)
    valid = (torch.rand(B, generator=g) < 0.8).to(device)
    cfg = CutConfig(**case)
    plan = plan_cuts(maps, valid, windows, flips, (H, W), cfg, torch.Generator().manual_seed(1))
    return images, maps, windows, flips, cfg, plan


def assert_matches_reference(apply, images, maps, windows, flips, cfg, plan) -> None:
    """`apply` (a fused kernel's runner) erases exactly the reference's pixels with the reference's values, except
    at float ties with the threshold, and reports the same erased fraction."""
    H, W = images.shape[-2:]
    ref, ref_frac = apply_plan_torch(images.clone(), plan, maps, windows, flips, cfg.fill)
    out, frac = apply(images.clone(), plan, maps, windows, flips, cfg.fill)
    differ = (out != ref).any(1)  # (B, H, W)
    sal = warp_to_crop(maps, windows, flips, (H, W))
    saliency_mode = ((plan.mode == MODE_THRESHOLD) | (plan.mode == MODE_AREA)).view(-1, 1, 1)
    ties = saliency_mode & ((sal - plan.tau.view(-1, 1, 1)).abs() < 1e-5)
    assert not bool((differ & ~ties).any()), f"{int((differ & ~ties).sum())} pixels differ off the threshold"
    # Ties are rare: the area rule puts one pixel per sample at its threshold by construction, beyond that a few.
    assert int(differ.sum()) <= 4 + int(saliency_mode.sum()), int(differ.sum())
    assert (frac - ref_frac).abs().max() <= 4 / (H * W)
    assert bool((ref != images).any()) or cfg.p == 0  # the case erases something: the comparison is not vacuous


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_cupy_kernel_matches_torch_reference(case, dtype, channels_last):
    pytest.importorskip("cupy")
    from gutout.kernels import apply_plan_cupy

    inputs = kernel_inputs(case, dtype, channels_last, torch.device("cuda"))

    def apply(*args):
        out = apply_plan_cupy(*args)
        torch.cuda.synchronize()
        return out

    assert_matches_reference(apply, *inputs)


# -- the same source on the host ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory):
    if cuda_host.compiler() is None:
        pytest.skip("no g++ to build the kernel source as host C++")
    return cuda_host.build(tmp_path_factory.mktemp("cuda-host"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_cuda_source_on_the_host_matches_torch_reference(host_kernel, case, dtype, channels_last):
    # Small batches (each launch starts 256 host threads), odd sizes so blocks end mid-row and mid-sample.
    inputs = kernel_inputs(case, dtype, channels_last, torch.device("cpu"), shape=(6, 3, 23, 19))
    apply = lambda *args: cuda_host.apply_plan_host(host_kernel, *args)  # noqa: E731
    assert_matches_reference(apply, *inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "case",
    [dict(policy="threshold", threshold=0.5), dict(policy="threshold", threshold=0.0), dict(policy="area", area=0.4)],
    ids=CASE_IDS,
)
def test_cuda_source_on_the_host_decides_exact_ties_as_the_reference(host_kernel, case, dtype):
    # Full windows at the map's own resolution warp exactly (weights 0 and 1), and the maps hold exact quarters,
    # so many pixels sit exactly on the threshold: `>` against `>=` must agree to the pixel, with no tie allowance.
    g = torch.Generator().manual_seed(3)
    B = 8
    images = (torch.randn(B, 2, 7, 7, generator=g) + 5).to(dtype)
    maps = torch.randint(0, 5, (B, 7, 7), generator=g).float() / 4
    windows = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(B, 4).contiguous()
    flips = torch.rand(B, generator=g) < 0.5
    cfg = CutConfig(**case, p=1.0)
    plan = plan_cuts(maps, None, windows, flips, (7, 7), cfg, torch.Generator().manual_seed(1))
    ref, ref_frac = apply_plan_torch(images.clone(), plan, maps, windows, flips, cfg.fill)
    out, frac = cuda_host.apply_plan_host(host_kernel, images.clone(), plan, maps, windows, flips, cfg.fill)
    assert torch.equal(out, ref) and torch.equal(frac, ref_frac)
    assert 0 < float(ref_frac.mean()) < 1


def test_host_build_counts_erased_pixels_across_blocks(host_kernel):
    # A box spanning three 256-pixel blocks: __syncthreads_count must sum each block, atomicAdd every block.
    images = torch.ones(2, 1, 30, 30)
    inputs = kernel_inputs(dict(policy="cutout", size=0.8, p=1.0), torch.float32, False, "cpu", (2, 1, 30, 30))
    _, maps, windows, flips, cfg, plan = inputs
    out, frac = cuda_host.apply_plan_host(host_kernel, images.clone(), plan, maps, windows, flips, 0.0)
    assert torch.equal(frac, (out == 0).float().mean(dim=(1, 2, 3)))
    assert bool((frac > 0.3).all())


def test_cuda_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed (the GPU machine compiles through CuPy instead)")
    instantiate = "".join(
        f"template __global__ void gutout_cut<{t}>({t}*, long long, long long, long long, long long, int, int, int, "
        "const float*, int, int, const float*, const unsigned char*, const int*, const float*, const int*, float, int, "
        "unsigned int, int*);\n"
        for t in ("float", "__half")
    )
    (tmp_path / "kernel.cu").write_text(SOURCE + instantiate)
    # The flags CuPy compiles with (gutout.kernels._kernel), for the GPUs the project runs on (H100/H200: sm_90).
    result = subprocess.run(
        [nvcc, "-std=c++17", "-fmad=false", "-arch=sm_90", "-c", "kernel.cu", "-o", "kernel.o"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0
