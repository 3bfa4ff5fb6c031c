"""The fused CPU kernel (Numba): the CuPy kernel's job for CPU tensors, writing only the erased pixels.

The torch reference (`gutout.cut.apply_plan_torch`) makes full passes over the batch: the warped saliency
(B, H, W), then a fill over every pixel of every channel. On a CPU that feeds DALI's decoding threads, those
passes are what the stage costs. This kernel makes none: per sample it lists the erased *spans* (row, first
column, end column), then writes the fill into them, channel after channel, and touches nothing else.

Why spans can be found without visiting every pixel: along a row, the bilinear warp (`gutout.warp`) blends
two taps whose weights are monotone in the column, so on a *segment* (a run of columns with one tap pair)
the saliency is monotone, and so is every rule's decision (`s > tau`, or `s >= tau and s > 0`). A segment
is decided whole by its taps' values, or by its two end pixels, or is bisected for its one boundary; a row
is skipped when even its largest value (or 0, outside the image) does not pass. Decisions use the formula of
`gutout.warp.interp_taps` in float32, so the paths agree except for float rounding within ~1e-6 of a
threshold (the tests allow those ties, as for the CuPy kernel). Where planning already warped the maps (the
`area` rule picks its threshold among those values) the kernel decides on those very values: no ties.

Fused with normalisation (`normalise_and_cut_numba`, for loaders that normalise on the host): the kernel
writes the batch from uint8 pixels, normalised, and puts the fill straight into the spans, so each pixel is
written once and the cut costs only its span search.

Numba is imported lazily and compiles on first use (then cached on disk); without it the torch reference runs.
NCHW and channels-last float32 batches take this path; others the reference. The stores are the kernel's cost
(`python bench/stage.py` measures it against the reference and a plain normalise pass).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from .affine import affine, check_pair
from .plan import CutPlan


@functools.lru_cache(maxsize=1)
def _numba():
    try:
        import numba
    except ImportError:
        return None
    return numba


def why_unsupported(images: torch.Tensor) -> str | None:
    """None when the kernel can run on `images`, else the reason in words."""
    if images.device.type != "cpu":
        return f"images are on {images.device}, not the CPU"
    if images.requires_grad and torch.is_grad_enabled():
        return "images require grad (the kernel writes through NumPy, outside autograd)"
    if images.dtype != torch.float32:
        return f"dtype {images.dtype} (the CPU kernel handles float32)"
    if images.dim() != 4 or not (images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last)):
        return "a layout other than contiguous NCHW or channels-last"
    if _numba() is None:
        return "Numba is not installed (pip install numba)"
    return None


def supports(images: torch.Tensor) -> bool:
    return why_unsupported(images) is None


@functools.cache
def _kernel():
    """The compiled kernel (first use compiles, about 3 s; Numba's disk cache makes later processes fast)."""
    from ._numba_cut import cut_batch

    return cut_batch


def apply_plan_numba(
    images: torch.Tensor, plan: CutPlan, maps, windows, flips, fill: float | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused kernel, in place on float32 CPU `images` (B, C, H, W); returns (images, erased fraction (B,))."""
    return _run(images, plan, maps, windows, flips, fill, None)


def normalise_and_cut_numba(
    source: torch.Tensor, out: torch.Tensor, mean, std, plan: CutPlan | None, maps, windows, flips, fill: float | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`out` = (uint8 `source` - mean) / std, then the plan's cut, one sample at a time in one pass.

    `source` (B, C, H, W) uint8, contiguous; `out` float32, same shape; `mean`/`std` per channel in the
    source's units. No plan: normalise only. Returns (out, erased fraction (B,)).
    """
    check_pair(source, out)  # the kernel does not bounds-check: a mismatch must not reach it
    B = source.shape[0]
    if plan is None:
        nothing = torch.zeros(B, dtype=torch.int32)  # MODE_NONE everywhere
        plan = CutPlan(mode=nothing, tau=torch.zeros(B), box=torch.zeros(B, 4, dtype=torch.int32), noise_seed=0)
        windows, flips = torch.zeros(B, 4), torch.zeros(B, dtype=torch.bool)
    scale, bias = affine(mean, std, source.shape[1])  # x * scale + bias, the arithmetic every normalising path shares
    return _run(out, plan, maps, windows, flips, fill, (source.contiguous(), scale, bias))


def _run(images, plan, maps, windows, flips, fill, normalise) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = images.shape
    if maps is None:  # box-only plans never read the map; give the kernel a valid array anyway
        maps = torch.zeros(B, 1, 1)
    maps, windows, flips = (t.detach().cpu() for t in (maps, windows, flips))
    saliency = plan.saliency if plan.saliency is not None else torch.zeros(0, 1, 1)
    source, scale, bias = normalise or (torch.zeros(0, 1, 1, 1, dtype=torch.uint8), torch.zeros(C), torch.zeros(C))
    erased = np.zeros(B, dtype=np.int64)
    _kernel()(
        _dense_memory(images).numpy(),  # a view: the kernel writes into the batch itself
        np.array(images.shape, dtype=np.int64),
        np.array(images.stride(), dtype=np.int64),
        maps.to(torch.float32).contiguous().numpy(),
        saliency.detach().to(torch.float32).contiguous().numpy(),
        windows.to(torch.float32).contiguous().numpy(),
        flips.to(torch.uint8).contiguous().numpy(),
        plan.mode.to(torch.int32).numpy(),
        plan.tau.to(torch.float32).numpy(),
        plan.box.to(torch.int32).numpy(),
        np.float32(0.0 if fill == "noise" else fill),
        fill == "noise",
        np.int64(plan.noise_seed),
        erased,
        _span_scratch(H * W),
        source.numpy(),
        scale.numpy(),
        bias.numpy(),
    )
    torch.autograd.graph.increment_version(images)  # written in place, as a torch in-place op would mark it
    return images, torch.from_numpy(erased).float() / (H * W)


_scratch = threading.local()  # per thread: two threads cutting at once must not share it


def _span_scratch(pixels: int) -> np.ndarray:
    """(pixels, 3) int64 span buffer, reused from batch to batch (a fresh one per batch means fresh pages)."""
    spans = getattr(_scratch, "spans", None)
    if spans is None or spans.shape[0] < pixels:
        spans = _scratch.spans = np.empty((pixels, 3), dtype=np.int64)
    return spans


def _dense_memory(images: torch.Tensor) -> torch.Tensor:
    """The batch's memory as one flat view, indexed with `images.stride()` (NCHW or channels-last)."""
    return images.as_strided((images.numel(),), (1,), images.storage_offset())
