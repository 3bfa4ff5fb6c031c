"""The CUDA kernel's own source (gutout.kernels.SOURCE), built as host C++ and run on the CPU.

The kernel's first line includes <cuda_fp16.h>; here that header is a host prelude that maps what the kernel
uses to host equivalents: `__global__`/`__device__` qualifiers, `threadIdx`/`blockIdx`/`blockDim` (per host
thread), `__half` (GCC's _Float16, IEEE binary16 with round-to-nearest-even, as `__float2half`), `atomicAdd`,
and `__syncthreads_count`, which really synchronises: each launch runs `blockDim.x` host threads that execute
every block together, meeting at a barrier where CUDA's threads would. Compiled without FMA contraction, as
CuPy compiles the kernel with `-fmad=false`, so every rounding step is the GPU's.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import torch

from gutout.kernels import DTYPES, SOURCE, prepare_launch
from gutout.plan import CutPlan

PRELUDE = r"""
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

struct dim3 { unsigned int x = 0, y = 0, z = 0; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim;

typedef _Float16 __half;
inline __half __float2half(float v) { return (__half)v; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }

// One block's rendezvous: every thread adds its predicate, waits for the others, reads the total, and waits
// again so that nobody resets the count before everyone has read it.
struct HostBlock {
    explicit HostBlock(int threads) : sync(threads) {}
    std::barrier<> sync;
    std::atomic<int> count{0};
};
static HostBlock* host_block = nullptr;

inline int __syncthreads_count(int predicate) {
    host_block->count.fetch_add(predicate ? 1 : 0);
    host_block->sync.arrive_and_wait();
    int total = host_block->count.load();
    host_block->sync.arrive_and_wait();
    return total;
}

// Run `body` (one thread's view of the kernel) over a (grid_x, grid_y) grid of `threads`-thread blocks.
template <typename Body>
void host_launch(int grid_x, int grid_y, int threads, Body body) {
    HostBlock block(threads);
    host_block = &block;
    blockDim.x = threads;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx.x = t;
            for (int by = 0; by < grid_y; ++by) {
                for (int bx = 0; bx < grid_x; ++bx) {
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    body();  // may return early, after its __syncthreads_count
                    block.sync.arrive_and_wait();  // the whole block is done...
                    if (t == 0) block.count.store(0);
                    block.sync.arrive_and_wait();  // ...and its count reset, before the next block starts
                }
            }
        });
    }
    for (auto& thread : pool) thread.join();
    host_block = nullptr;
}
"""

DRIVER = r"""
#define LAUNCHER(NAME, T)                                                                                       \
extern "C" void NAME(int grid_x, int grid_y, int threads, T* images, long long sB, long long sC, long long sH,  \
                     long long sW, int C, int H, int W, const float* maps, int h, int w, const float* windows,  \
                     const unsigned char* flips, const int* mode, const float* tau, const int* box, float fill, \
                     int noise, unsigned int seed, int* erased) {                                             \
    host_launch(grid_x, grid_y, threads, [&] {                                                                  \
        gutout_cut<T>(images, sB, sC, sH, sW, C, H, W, maps, h, w, windows, flips, mode, tau, box, fill, noise, \
                      seed, erased);                                                                            \
    });                                                                                                         \
}
LAUNCHER(gutout_cut_float, float)
LAUNCHER(gutout_cut_half, __half)
"""

FLAGS = ["-std=c++20", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread"]


def compiler() -> str | None:
    return shutil.which("g++")


def build(folder: Path) -> ctypes.CDLL:
    """Compile SOURCE + the driver against the prelude (once per source, prelude and flags: cached by hash)."""
    key = hashlib.sha256("\0".join([SOURCE, PRELUDE, DRIVER, *FLAGS]).encode()).hexdigest()[:16]
    library = folder / f"gutout_cut_host_{key}.so"
    if not library.exists():
        include = folder / f"include-{key}"
        include.mkdir(parents=True, exist_ok=True)
        (include / "cuda_fp16.h").write_text(PRELUDE)
        (folder / f"kernel-{key}.cpp").write_text(SOURCE + DRIVER)
        subprocess.run(
            [compiler(), *FLAGS, f"-I{include}", str(folder / f"kernel-{key}.cpp"), "-o", str(library)],
            check=True,
            capture_output=True,
            text=True,
        )
    return ctypes.CDLL(str(library))


def apply_plan_host(
    library: ctypes.CDLL, images: torch.Tensor, plan: CutPlan, maps, windows, flips, fill
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_plan_cupy`, with the same launch, on the CPU: in place on `images`; (images, erased fraction)."""
    launch = prepare_launch(images, plan, maps, windows, flips, fill)
    t, s = launch.tensors, launch.scalars
    function = getattr(library, f"gutout_cut_{'float' if DTYPES[images.dtype] == 'float' else 'half'}")
    pointer = lambda name: ctypes.c_void_p(t[name].data_ptr())
    function(
        ctypes.c_int(launch.grid[0]),
        ctypes.c_int(launch.grid[1]),
        ctypes.c_int(launch.block),
        pointer("images"),
        *(ctypes.c_longlong(s[k]) for k in ("sB", "sC", "sH", "sW")),
        *(ctypes.c_int(s[k]) for k in ("C", "H", "W")),
        pointer("maps"),
        ctypes.c_int(s["h"]),
        ctypes.c_int(s["w"]),
        pointer("windows"),
        pointer("flips"),
        pointer("mode"),
        pointer("tau"),
        pointer("box"),
        ctypes.c_float(s["fill"]),
        ctypes.c_int(s["noise"]),
        ctypes.c_uint(s["seed"] & 0xFFFFFFFF),
        pointer("erased"),
    )
    return images, t["erased"].float() / (s["H"] * s["W"])
