"""The cut: erase pixels of a batch of crops, chosen by canonical-frame saliency maps (or at random).

A cut happens in two steps that every implementation shares:

1. `plan_cuts` (`gutout.plan`): per sample, whether to cut, the rule, and its threshold or box.
2. Painting the plan: `apply_plan_torch` here (the reference, any device), or a fused kernel — CUDA
   (`gutout.kernels`: warp, decision and fill in one pass over the erased pixels only) or Numba on the CPU
   (`gutout.cpu_kernel`).

Erased pixels get `fill` in every channel; no other pixel changes.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import torch

from . import cpu_kernel, kernels
from .config import from_mapping
from .plan import MODE_AREA, MODE_BOX, MODE_NONE, MODE_THRESHOLD, POLICIES, CutConfig, CutPlan, plan_cuts
from .warp import warp_to_crop

# The plan's names are the cut's vocabulary too: callers import them from either module.
__all__ = [
    "MODE_AREA",
    "MODE_BOX",
    "MODE_NONE",
    "MODE_THRESHOLD",
    "POLICIES",
    "CutConfig",
    "CutPlan",
    "plan_cuts",
    "apply_plan_torch",
    "check_inputs",
    "cut",
    "erase_weights",
    "hash_noise",
    "resolve_kernel",
]


def hash_noise(flat_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform noise with unit variance from a counter hash of the NCHW linear index (float32).

    A hash rather than an RNG stream so that the CuPy kernel, which only visits erased pixels, produces
    the very same values as this reference.
    """
    mask32 = 0xFFFFFFFF
    x = (flat_index + (seed * 0x9E3779B9)) & mask32  # int64 arithmetic, kept to 32 bits
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask32
    x = x ^ (x >> 16)
    uniform = (x >> 8).to(torch.float32) * (1.0 / 16777216.0)  # [0, 1), 24 bits
    return (uniform * 2.0 - 1.0) * math.sqrt(3.0)


_scratch = threading.local()  # per thread: two threads cutting at once must not share the buffer


def _cpu_scratch(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 buffer reused from batch to batch on the CPU: a fresh 13 MB tensor per batch would be fresh
    pages from the OS each time (thousands of page faults), which costs as much as the warp itself. It never
    leaves this module: the cut consumes it in place and returns new tensors."""
    buffer = getattr(_scratch, "warp", None)
    if buffer is None or tuple(buffer.shape) != tuple(shape):
        buffer = _scratch.warp = torch.empty(shape, dtype=torch.float32)
    return buffer


def erase_weights(
    plan: CutPlan, maps: torch.Tensor | None, windows: torch.Tensor, flips: torch.Tensor, image_hw
) -> torch.Tensor:
    """(B, H, W) float32: 1.0 where the plan erases, 0.0 elsewhere. Rules no sample uses are never computed.

    Float rather than bool because the fill is then one fused pass (x - x * e, or lerp), with no bool -> float
    copy; the threshold rule compares the saliency in place, the warp being its only other use.
    """
    H, W = image_hw
    B = plan.mode.shape[0]
    rules = [r for r in (MODE_THRESHOLD, MODE_AREA, MODE_BOX) if bool((plan.mode == r).any())]
    weights = None
    for rule in rules:
        chosen = plan.mode == rule  # (B,)
        if rule == MODE_BOX:
            r0, c0, r1, c1 = plan.box.view(-1, 4, 1).unbind(1)  # each (B, 1)
            rows = torch.arange(H, device=chosen.device)
            cols = torch.arange(W, device=chosen.device)
            inside = ((rows >= r0) & (rows < r1))[:, :, None] & ((cols >= c0) & (cols < c1))[:, None, :]
            term = inside.view(torch.uint8).to(torch.float32)  # bool -> uint8 (a view) -> float: ~6x faster
        else:
            if plan.saliency is None:
                out = _cpu_scratch((B, H, W)) if not plan.mode.is_cuda else None
                plan.saliency = warp_to_crop(maps, windows, flips, image_hw, out=out)  # (B, H, W)
            tau = plan.tau.view(-1, 1, 1)
            if rule == MODE_THRESHOLD and MODE_AREA not in rules:
                term, plan.saliency = plan.saliency.gt_(tau), None  # in place: 1.0 where saliency > tau
            elif rule == MODE_THRESHOLD:
                term = plan.saliency.gt(tau).view(torch.uint8).to(torch.float32)
            else:
                term = ((plan.saliency >= tau) & (plan.saliency > 0)).view(torch.uint8).to(torch.float32)
        if int(chosen.sum()) < B:
            term.mul_(chosen.view(-1, 1, 1).to(term.dtype))
        weights = term if weights is None else torch.maximum(weights, term, out=weights)
    if weights is None:
        weights = torch.zeros(B, H, W, dtype=torch.float32, device=plan.mode.device)
    return weights


def apply_plan_torch(
    images: torch.Tensor, plan: CutPlan, maps, windows, flips, fill: float | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation: erase in place; returns (images, erased fraction (B,) float32)."""
    erase = erase_weights(plan, maps, windows, flips, tuple(images.shape[-2:]))  # (B, H, W) 1.0 = erased
    if fill == "noise":
        mask_bchw = (erase > 0)[:, None].expand_as(images)
        flat_index = mask_bchw.reshape(-1).nonzero().squeeze(1)  # NCHW linear index of erased pixels
        images[mask_bchw] = hash_noise(flat_index, plan.noise_seed).to(images.dtype)
    else:
        weight = erase[:, None].to(images.dtype)  # (B, 1, H, W), broadcast over channels
        if float(fill) == 0.0:
            images.addcmul_(images, weight, value=-1)  # x - x * e: exactly x where e = 0, exactly 0 where e = 1
        else:  # torch.lerp is exact at both ends: start where the weight is 0, end where it is 1
            images.lerp_(images.new_tensor(float(fill)), weight)
    return images, erase.mean(dim=(1, 2))


def check_inputs(images, maps, windows, flips, config: CutConfig) -> None:
    """The shapes `cut` needs, each mismatch an error that names the argument and both shapes."""
    if images.dim() != 4:
        raise ValueError(f"cut: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"cut: images must be floating point (normalised), got {images.dtype}")
    B = images.shape[0]
    if config.needs_maps:
        if maps is None or maps.dim() != 3 or maps.shape[0] != B:
            got = None if maps is None else tuple(maps.shape)
            raise ValueError(f"cut: maps must be (B={B}, h, w) for policy {config.policy!r}, got {got}")
        if windows is None or tuple(windows.shape) != (B, 4):
            got = None if windows is None else tuple(windows.shape)
            raise ValueError(f"cut: windows must be (B={B}, 4) as (y0, x0, y1, x1), got {got}")
        if flips is None or tuple(flips.shape) != (B,):
            raise ValueError(f"cut: flips must be (B={B},), got {None if flips is None else tuple(flips.shape)}")


def resolve_kernel(images: torch.Tensor, config: CutConfig) -> str:
    """The implementation that will cut `images`: a fused kernel ("cupy" on CUDA, "numba" on the CPU) or the
    torch reference. "auto" takes the device's fused kernel where it can run and the reference elsewhere;
    naming a kernel that cannot run is an error that says why."""
    fused = {"cupy": kernels, "numba": cpu_kernel}
    if config.kernel == "torch":
        return "torch"
    if config.kernel == "auto":
        name = "cupy" if images.is_cuda else "numba"
        return name if fused[name].supports(images) else "torch"
    reason = fused[config.kernel].why_unsupported(images)
    if reason is not None:
        raise ValueError(f"cut: kernel {config.kernel!r} cannot run here ({reason})")
    return config.kernel


def cut(
    images: torch.Tensor,
    maps: torch.Tensor | None = None,
    windows: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
    config: CutConfig | None = None,
    *,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    **overrides: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase saliency-chosen pixels of `images` (B, C, H, W); returns (images, erased fraction (B,)).

    `maps` (B, h, w) are canonical-frame saliency maps, `windows` (B, 4) float crop windows
    (y0, x0, y1, x1) in that frame, `flips` (B,) bool. `valid` (B,) marks samples that have a map
    (the others follow `config.cold_start`). Keyword `overrides` set `CutConfig` fields directly:
    `cut(x, maps, windows, flips, policy="area", area=0.3)`.
    """
    if config is None or overrides:
        config = from_mapping(CutConfig, None if config is None else dataclasses.asdict(config), **overrides)
    B, _, H, W = images.shape if images.dim() == 4 else (0, 0, 0, 0)
    check_inputs(images, maps, windows, flips, config)
    if windows is None:  # box-only policies don't need windows; give the plan full-frame ones
        windows = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=images.device).expand(B, 4)
        flips = torch.zeros(B, dtype=torch.bool, device=images.device)
    if not inplace:
        images = images.clone()
    if config.policy == "none":
        return images, torch.zeros(B, device=images.device)
    if maps is not None:
        maps = maps.to(images.device)
    windows = windows.to(images.device)
    flips = flips.to(images.device)
    plan = plan_cuts(maps, valid, windows, flips, (H, W), config, generator)
    kernel = resolve_kernel(images, config)
    if kernel == "cupy":
        return kernels.apply_plan_cupy(images, plan, maps, windows, flips, config.fill)
    if kernel == "numba":
        return cpu_kernel.apply_plan_numba(images, plan, maps, windows, flips, config.fill)
    return apply_plan_torch(images, plan, maps, windows, flips, config.fill)
