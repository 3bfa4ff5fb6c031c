"""The fused CuPy kernel: warp the canonical map into the crop, decide, and fill, in one pass, in place.

One thread per output pixel (all channels). It reads only the sample's small map (h x w floats, in cache)
and writes only erased pixels, so the stage costs less than a normalise pass over the batch. The
arithmetic mirrors `gutout.warp.interp_taps` and `gutout.cut.erase_weights` line by line. One source, three
ways to run it: CuPy on a GPU; nvcc compiles it in the tests wherever nvcc exists; and the tests build it as
host C++ (tests/cuda_host.py) and compare it with the torch reference pixel for pixel, with or without a GPU.

CuPy is imported lazily: importing gutout never needs it.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from .plan import CutPlan

SOURCE = r"""
#include <cuda_fp16.h>

__device__ __forceinline__ unsigned int lowbias32(unsigned int x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

// Same as gutout.cut.hash_noise: uniform in [-sqrt(3), sqrt(3)) from the NCHW linear index.
__device__ __forceinline__ float hash_noise(long long flat_index, unsigned int seed) {
    unsigned int x = (unsigned int)(flat_index + (long long)seed * 0x9E3779B9LL);
    x = lowbias32(x);
    float u = (float)(x >> 8) * (1.0f / 16777216.0f);
    return (u * 2.0f - 1.0f) * 1.7320508075688772f;
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

// One axis of gutout.warp.interp_taps: the two taps and weights of output cell `i` of `out`.
__device__ __forceinline__ bool taps(float lo, float hi, int i, int out, int in,
                                     int* i0, int* i1, float* w0, float* w1) {
    float centre = ((float)i + 0.5f) / (float)out;
    float v = lo + centre * (hi - lo);
    if (!(v >= 0.0f && v <= 1.0f)) return false;
    float pos = fminf(fmaxf(v * (float)in - 0.5f, 0.0f), (float)(in - 1));
    float f0 = fminf(floorf(pos), (float)max(in - 2, 0));
    float frac = pos - f0;
    *i0 = (int)f0;
    *i1 = min(*i0 + 1, in - 1);
    *w0 = 1.0f - frac;
    *w1 = frac;
    return true;
}

template <typename T>
__global__ void gutout_cut(
    T* images, long long sB, long long sC, long long sH, long long sW, int C, int H, int W,
    const float* maps, int h, int w, const float* windows, const unsigned char* flips,
    const int* mode, const float* tau, const int* box,
    float fill, int noise, unsigned int seed, int* erased)
{
    const int b = blockIdx.y;
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    const int m = mode[b];
    bool erase = false;
    int i = 0, j = 0;
    if (p < H * W && m != 0) {
        i = p / W;
        j = p % W;
        if (m == 3) {
            const int* bx = box + 4 * b;
            erase = i >= bx[0] && i < bx[2] && j >= bx[1] && j < bx[3];
        } else {
            const float* win = windows + 4 * b;
            const int jc = flips[b] ? W - 1 - j : j;  // flip after crop: output column j reads crop column W-1-j
            int y0, y1, x0, x1;
            float wy0, wy1, wx0, wx1;
            if (taps(win[0], win[2], i, H, h, &y0, &y1, &wy0, &wy1) &&
                taps(win[1], win[3], jc, W, w, &x0, &x1, &wx0, &wx1)) {
                const float* mp = maps + (long long)b * h * w;
                float top = mp[y0 * w + x0] * wx0 + mp[y0 * w + x1] * wx1;
                float bottom = mp[y1 * w + x0] * wx0 + mp[y1 * w + x1] * wx1;
                float s = wy0 * top + wy1 * bottom;
                const float t = tau[b];
                erase = (m == 1) ? (s > t) : (s >= t && s > 0.0f);
            } else {
                // Outside the image the saliency is 0: erased only by a threshold below 0, as in torch.
                const float t = tau[b];
                erase = (m == 1) ? (0.0f > t) : false;
            }
        }
    }
    const int count = __syncthreads_count(erase);
    if (threadIdx.x == 0 && count) atomicAdd(erased + b, count);
    if (!erase) return;
    for (int c = 0; c < C; ++c) {
        float v = fill;
        if (noise) v = hash_noise((((long long)b * C + c) * H + i) * W + j, seed);
        store(images + b * sB + c * sC + i * sH + j * sW, v);
    }
}
"""

THREADS = 256  # threads per block; a block covers 256 pixels of one sample
DTYPES = {torch.float32: "float", torch.float16: "__half"}  # the kernel's template argument per torch dtype


@functools.lru_cache(maxsize=1)
def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def why_unsupported(images: torch.Tensor) -> str | None:
    """None when the kernel can run on `images`, else the reason in words."""
    if not images.is_cuda:
        return f"images are on {images.device}, not CUDA"
    if images.dtype not in DTYPES:
        return f"dtype {images.dtype} (the kernel handles float32 and float16)"
    cupy = _cupy()
    if cupy is None:
        return "CuPy is not installed (pip install 'gutout[gpu]')"
    if not cupy.cuda.is_available():
        return "CuPy sees no CUDA device"
    return None


def supports(images: torch.Tensor) -> bool:
    return why_unsupported(images) is None


@functools.cache
def _kernel(type_name: str, device_index: int):
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        # -fmad=false: no fused multiply-adds, so each rounding step matches the torch reference.
        module = cupy.RawModule(
            code=SOURCE,
            options=("-std=c++17", "-fmad=false"),
            name_expressions=[f"gutout_cut<{type_name}>"],
        )
        return module.get_function(f"gutout_cut<{type_name}>")


def _torch_stream(cupy, device: torch.device):
    """Launch on torch's current stream, so the kernel is ordered with the surrounding torch work."""
    stream = torch.cuda.current_stream(device)
    with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; older CuPy lacks the replacement
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(stream.cuda_stream, device.index or 0)


class Launch(NamedTuple):
    """One launch of `gutout_cut`: the grid, the block, and the arguments in the kernel's order (tensors on the
    images' device, contiguous where the kernel indexes them flat; ints and floats as the kernel types them)."""

    grid: tuple[int, int]
    block: int
    tensors: dict[str, torch.Tensor]  # images, maps, windows, flips, mode, tau, box, erased
    scalars: dict[str, int | float]  # sB, sC, sH, sW, C, H, W, h, w, fill, noise, seed


def prepare_launch(images: torch.Tensor, plan: CutPlan, maps, windows, flips, fill: float | str) -> Launch:
    """What every runner of the kernel source passes it: CuPy on a GPU, or the host build the tests drive."""
    B, C, H, W = images.shape
    device = images.device
    if maps is None:  # box-only plans never read the map; give the kernel a valid pointer anyway
        maps = torch.zeros(B, 1, 1, device=device)
    tensors = {
        "images": images,
        "maps": maps.to(device=device, dtype=torch.float32).contiguous(),
        "windows": windows.to(device=device, dtype=torch.float32).contiguous(),
        "flips": flips.to(device=device, dtype=torch.uint8).contiguous(),  # DLPack-safe bool
        "mode": plan.mode.to(device=device, dtype=torch.int32).contiguous(),
        "tau": plan.tau.to(device=device, dtype=torch.float32).contiguous(),
        "box": plan.box.to(device=device, dtype=torch.int32).contiguous(),
        "erased": torch.zeros(B, dtype=torch.int32, device=device),
    }
    sB, sC, sH, sW = images.stride()  # any memory layout, channels-last included
    scalars = dict(
        sB=sB,
        sC=sC,
        sH=sH,
        sW=sW,
        C=C,
        H=H,
        W=W,
        h=tensors["maps"].shape[1],
        w=tensors["maps"].shape[2],
        fill=0.0 if fill == "noise" else float(fill),
        noise=int(fill == "noise"),
        seed=plan.noise_seed,
    )
    return Launch(((H * W + THREADS - 1) // THREADS, B), THREADS, tensors, scalars)


def apply_plan_cupy(
    images: torch.Tensor, plan: CutPlan, maps, windows, flips, fill: float | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernel, in place on `images` (B, C, H, W) on CUDA; returns (images, erased fraction (B,))."""
    cupy = _cupy()
    launch = prepare_launch(images, plan, maps, windows, flips, fill)
    t, s = launch.tensors, launch.scalars
    device = images.device
    kernel = _kernel(DTYPES[images.dtype], device.index or 0)
    view = cupy.from_dlpack  # zero-copy views of the torch tensors
    with cupy.cuda.Device(device.index or 0), _torch_stream(cupy, device):
        kernel(
            launch.grid,
            (launch.block,),
            (
                view(t["images"]),
                *(cupy.int64(s[k]) for k in ("sB", "sC", "sH", "sW")),
                *(cupy.int32(s[k]) for k in ("C", "H", "W")),
                view(t["maps"]),
                cupy.int32(s["h"]),
                cupy.int32(s["w"]),
                view(t["windows"]),
                view(t["flips"]),
                view(t["mode"]),
                view(t["tau"]),
                view(t["box"]),
                cupy.float32(s["fill"]),
                cupy.int32(s["noise"]),
                cupy.uint32(s["seed"]),
                view(t["erased"]),
            ),
        )
    return images, t["erased"].float() / (s["H"] * s["W"])
