"""The cut: erase pixels of a batch of crops, chosen by canonical-frame saliency maps (or at random).

A cut happens in two steps that both implementations share:

1. `plan_cuts` (torch, tiny tensors): per sample, draw whether to cut, pick the rule (threshold, area,
   box, or a cold-start Cutout where no valid map exists) and its parameters: a saliency threshold `tau`
   or an integer box.
2. Apply the plan to the pixels: `apply_plan_torch` (the reference, any device) or the fused CuPy kernel
   in `gutout.kernels` (warp, decision and fill in one pass over the erased pixels only).

Erased pixels get `fill` in every channel; no other pixel changes.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, check_choice, check_range, check_types, from_mapping
from .warp import warp_to_crop

POLICIES = ("threshold", "area", "box", "cutout", "erasing", "none")
KERNELS = ("auto", "torch", "cupy", "numba")

# Per-sample rules in a plan; the CuPy kernel uses the same numbers.
MODE_NONE, MODE_THRESHOLD, MODE_AREA, MODE_BOX = 0, 1, 2, 3


@dataclass(frozen=True)
class CutConfig:
    policy: str = "threshold"
    threshold: float = 0.5  # erase where the warped, max-normalised saliency > threshold
    area: float = 0.25  # `area` policy: fraction of the crop's pixels to erase, most salient first
    size: float = 0.5  # box / Cutout side as a fraction of the crop side (Cutout paper: 16/32 on CIFAR)
    box_center: str = "peak"  # `box`: centre on the saliency peak, or `sample` it with p ∝ saliency^gamma
    gamma: float = 1.0
    p: float = 1.0  # probability that a sample is cut at all
    fill: float | str = 0.0  # 0 after normalisation is the dataset mean; "noise" = uniform, unit variance
    erase_scale: tuple[float, float] = (0.02, 0.33)  # `erasing`: torchvision RandomErasing's area range...
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # ...and aspect-ratio range
    cold_start: str = "cutout"  # samples without a valid map: Cutout of the policy's area, or "none"
    kernel: str = "auto"  # "auto": the fused kernel of the device (CuPy on CUDA, Numba on the CPU) if it imports

    def __post_init__(self):
        check_types(self)
        name = "CutConfig"
        check_choice(name, "policy", self.policy, POLICIES)
        check_range(name, "threshold", self.threshold, 0.0, 1.0)
        check_range(name, "area", self.area, 0.0, 1.0)
        check_range(name, "size", self.size, 0.0, 1.0)
        check_choice(name, "box_center", self.box_center, ("peak", "sample"))
        check_range(name, "gamma", self.gamma, 0.0, math.inf, lo_open=True)
        check_range(name, "p", self.p, 0.0, 1.0)
        if isinstance(self.fill, str):
            check_choice(name, "fill", self.fill, ("noise",))
        elif not isinstance(self.fill, (int, float)) or not math.isfinite(self.fill):
            raise ConfigError(f"{name}.fill={self.fill!r} must be a finite number or 'noise'")
        check_choice(name, "cold_start", self.cold_start, ("cutout", "none"))
        if not 0 < self.erase_scale[0] <= self.erase_scale[1] <= 1:
            raise ConfigError(f"{name}.erase_scale={self.erase_scale!r} must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.erase_ratio[0] <= self.erase_ratio[1]:
            raise ConfigError(f"{name}.erase_ratio={self.erase_ratio!r} must satisfy 0 < lo <= hi")
        check_choice(name, "kernel", self.kernel, KERNELS)

    @property
    def needs_maps(self) -> bool:
        return self.policy in ("threshold", "area", "box")

    @property
    def cold_start_side(self) -> float:
        """Side (fraction of the crop side) of the Cutout used where no map exists: the same area."""
        return math.sqrt(self.area) if self.policy == "area" else self.size


@dataclass
class CutPlan:
    mode: torch.Tensor  # (B,) int32, one of MODE_*
    tau: torch.Tensor  # (B,) float32, saliency threshold for MODE_THRESHOLD / MODE_AREA
    box: torch.Tensor  # (B, 4) int32 (r0, c0, r1, c1), half-open pixel box for MODE_BOX
    noise_seed: int  # seeds the hash noise when fill == "noise"
    saliency: torch.Tensor | None = None  # (B, H, W) warped saliency, when planning had to compute it


def _random_boxes(n: int, hw: tuple[int, int], side: float, generator: torch.Generator | None):
    """Cutout boxes: centre uniform over the crop (the box may hang over the edge and is clipped)."""
    H, W = hw
    cy = torch.randint(0, H, (n,), generator=generator)
    cx = torch.randint(0, W, (n,), generator=generator)
    return _boxes_at(cy, cx, hw, side)


def _erasing_boxes(n: int, hw: tuple[int, int], config: CutConfig, generator: torch.Generator | None):
    """torchvision's RandomErasing boxes: area and log-aspect uniform, up to 10 tries, inside the image.

    Vectorised over samples: each of the 10 tries is drawn for every sample at once, and a sample keeps its
    first try that fits; a sample with none is not erased (an empty box), as RandomErasing returns it intact.
    """
    H, W = hw
    tries = 10
    area = H * W * torch.empty(n, tries).uniform_(*config.erase_scale, generator=generator)
    log_ratio = torch.empty(n, tries).uniform_(math.log(config.erase_ratio[0]), math.log(config.erase_ratio[1]),
                                                generator=generator)  # fmt: skip
    ratio = log_ratio.exp()
    h = (area * ratio).sqrt().round().long()  # (n, tries)
    w = (area / ratio).sqrt().round().long()
    fits = (h < H) & (w < W)
    first = torch.where(fits.any(1), fits.float().argmax(1), -1)  # (n,) index of the first try that fits
    pick = first.clamp_min(0)[:, None]
    h, w = h.gather(1, pick)[:, 0], w.gather(1, pick)[:, 0]
    r0 = (torch.rand(n, generator=generator) * (H - h + 1)).floor().long()
    c0 = (torch.rand(n, generator=generator) * (W - w + 1)).floor().long()
    boxes = torch.stack([r0, c0, r0 + h, c0 + w], dim=1)
    boxes[first < 0] = 0
    return boxes.to(torch.int32)


def _boxes_at(cy: torch.Tensor, cx: torch.Tensor, hw: tuple[int, int], side: float) -> torch.Tensor:
    H, W = hw
    sh, sw = round(side * H), round(side * W)
    r0, c0 = cy - sh // 2, cx - sw // 2
    boxes = torch.stack([r0, c0, r0 + sh, c0 + sw], dim=1)  # (n, 4)
    lo = torch.zeros(4, dtype=boxes.dtype, device=boxes.device)
    hi = torch.tensor([H, W, H, W], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(torch.maximum(boxes, lo), hi).to(torch.int32)


def plan_cuts(
    maps: torch.Tensor | None,
    valid: torch.Tensor | None,
    windows: torch.Tensor | None,
    flips: torch.Tensor | None,
    image_hw: tuple[int, int],
    config: CutConfig,
    generator: torch.Generator | None = None,
) -> CutPlan:
    """Decide, per sample, what to erase. Random draws come from `generator` (a CPU generator)."""
    H, W = image_hw
    B = int(windows.shape[0]) if windows is not None else int(maps.shape[0])
    device = maps.device if maps is not None else (windows.device if windows is not None else "cpu")
    cut = torch.rand(B, generator=generator) < config.p  # CPU draws: identical on every device
    mode = torch.zeros(B, dtype=torch.int32)
    tau = torch.zeros(B, dtype=torch.float32)
    box = torch.zeros(B, 4, dtype=torch.int32)
    noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    saliency = None

    if config.policy == "cutout":
        mode[cut] = MODE_BOX
        box[cut] = _random_boxes(int(cut.sum()), image_hw, config.size, generator)
    elif config.policy == "erasing":
        mode[cut] = MODE_BOX
        box[cut] = _erasing_boxes(int(cut.sum()), image_hw, config, generator)
    elif config.needs_maps:
        if maps is None:
            raise ValueError(f"policy {config.policy!r} needs saliency maps, got none")
        has_map = torch.ones(B, dtype=torch.bool) if valid is None else valid.detach().cpu().to(torch.bool)
        use_map = cut & has_map
        cold = cut & ~has_map
        if config.cold_start == "cutout" and bool(cold.any()):
            mode[cold] = MODE_BOX
            box[cold] = _random_boxes(int(cold.sum()), image_hw, config.cold_start_side, generator)
        if config.policy == "threshold":
            mode[use_map] = MODE_THRESHOLD
            tau[use_map] = config.threshold
        elif bool(use_map.any()):
            saliency = warp_to_crop(maps, windows, flips, image_hw)  # (B, H, W)
            flat = saliency.flatten(1)  # (B, H*W)
            if config.policy == "area":
                k = max(1, round(config.area * H * W)) if config.area > 0 else 0
                if k > 0:
                    kth_largest = flat.kthvalue(H * W - k + 1, dim=1).values.cpu()  # (B,)
                    mode[use_map] = MODE_AREA
                    tau[use_map] = kth_largest[use_map]
            else:  # box
                peak, centre = (t.cpu() for t in flat.max(dim=1))
                use_map &= peak > 0  # an all-zero map means "nothing to cut"
                if config.box_center == "sample":
                    weights = flat.clamp_min(0).cpu() ** config.gamma
                    weights[~use_map] = 1.0  # rows that won't be used still need a valid distribution
                    centre = torch.multinomial(weights, 1, generator=generator).squeeze(1)
                mode[use_map] = MODE_BOX
                box[use_map] = _boxes_at(centre // W, centre % W, image_hw, config.size)[use_map]
    return CutPlan(
        mode=mode.to(device),
        tau=tau.to(device),
        box=box.to(device),
        noise_seed=noise_seed,
        saliency=saliency,
    )


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
    from . import cpu_kernel, kernels

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
        from .kernels import apply_plan_cupy

        return apply_plan_cupy(images, plan, maps, windows, flips, config.fill)
    if kernel == "numba":
        from .cpu_kernel import apply_plan_numba

        return apply_plan_numba(images, plan, maps, windows, flips, config.fill)
    return apply_plan_torch(images, plan, maps, windows, flips, config.fill)
