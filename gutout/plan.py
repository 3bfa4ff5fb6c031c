"""Deciding a cut: the policies, their configuration, and the per-sample plan every painter applies.

`plan_cuts` (torch, tiny tensors) draws, per sample, whether to cut and which rule applies — a saliency threshold
`tau` (threshold and area policies), an integer pixel box (box, Cutout, Random Erasing, and the cold-start Cutout
where a sample has no valid map) — from a CPU generator, so every device and painter gets the same plan.
`gutout.cut` paints plans (the torch reference); `gutout.kernels` (CUDA) and `gutout.cpu_kernel` (Numba) too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError, check_choice, check_range, check_types
from .warp import warp_to_crop

POLICIES = ("threshold", "area", "box", "keep", "cutout", "erasing", "none")
SALIENCY_POLICIES = ("threshold", "area", "box", "keep")  # the policies that read maps (and need them refreshed)
THRESHOLD_RULES = ("fixed", "sigma", "range")
BOX_CENTERS = ("peak", "sample")
COLD_STARTS = ("cutout", "none")
KERNELS = ("auto", "torch", "cupy", "numba")

# Per-sample rules in a plan; the CuPy kernel uses the same numbers.
MODE_NONE, MODE_THRESHOLD, MODE_AREA, MODE_BOX = 0, 1, 2, 3


@dataclass(frozen=True)
class CutConfig:
    policy: str = "threshold"
    threshold: float = 0.5  # erase where the warped, max-normalised saliency > threshold (keep: spare it)
    # How the threshold policy sets each sample's threshold: "fixed" (`threshold`), "sigma" (the map's mean + k
    # standard deviations: MaskTune erases above mean + 2 sigma), or "range" (drawn per sample from
    # `threshold_range`: WS-DAN drops above U(0.2, 0.5) x max).
    threshold_rule: str = "fixed"
    k: float = 2.0
    threshold_range: tuple[float, float] = (0.2, 0.5)
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
        name = type(self).__name__  # configs that extend this one (TrainConfig) are named in their errors
        check_choice(name, "policy", self.policy, POLICIES)
        check_range(name, "threshold", self.threshold, 0.0, 1.0)
        check_choice(name, "threshold_rule", self.threshold_rule, THRESHOLD_RULES)
        check_range(name, "k", self.k, -10.0, 10.0)
        if not 0 <= self.threshold_range[0] <= self.threshold_range[1] <= 1:
            raise ConfigError(f"{name}.threshold_range={self.threshold_range!r} must satisfy 0 <= lo <= hi <= 1")
        check_range(name, "area", self.area, 0.0, 1.0)
        check_range(name, "size", self.size, 0.0, 1.0)
        check_choice(name, "box_center", self.box_center, BOX_CENTERS)
        check_range(name, "gamma", self.gamma, 0.0, math.inf, lo_open=True)
        check_range(name, "p", self.p, 0.0, 1.0)
        if isinstance(self.fill, str):
            check_choice(name, "fill", self.fill, ("noise",))
        elif not isinstance(self.fill, (int, float)) or not math.isfinite(self.fill):
            raise ConfigError(f"{name}.fill={self.fill!r} must be a finite number or 'noise'")
        check_choice(name, "cold_start", self.cold_start, COLD_STARTS)
        if not 0 < self.erase_scale[0] <= self.erase_scale[1] <= 1:
            raise ConfigError(f"{name}.erase_scale={self.erase_scale!r} must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.erase_ratio[0] <= self.erase_ratio[1]:
            raise ConfigError(f"{name}.erase_ratio={self.erase_ratio!r} must satisfy 0 < lo <= hi")
        check_choice(name, "kernel", self.kernel, KERNELS)

    @property
    def needs_maps(self) -> bool:
        return self.policy in SALIENCY_POLICIES

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


def random_boxes(n: int, hw: tuple[int, int], side: float, generator: torch.Generator | None):
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
    log_ratio = torch.empty(n, tries).uniform_(
        math.log(config.erase_ratio[0]), math.log(config.erase_ratio[1]), generator=generator
    )
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


def _thresholds(maps: torch.Tensor, config: CutConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) float32 CPU: each sample's saliency threshold under the threshold rule. The sigma rule reads the
    sample's canonical map (its mean and standard deviation over the cells); the range rule draws one per sample."""
    B = maps.shape[0]
    if config.threshold_rule == "sigma":
        flat = maps.detach().float().flatten(1)  # (B, h*w)
        return (flat.mean(1) + config.k * flat.std(1, unbiased=False)).cpu()
    if config.threshold_rule == "range":
        lo, hi = config.threshold_range
        return torch.empty(B).uniform_(lo, hi, generator=generator) if hi > lo else torch.full((B,), lo)
    return torch.full((B,), config.threshold)


KEEP_TRIES = 10  # Cutout squares drawn per sample before giving up on sparing its salient pixels


def _sparing_boxes(saliency: torch.Tensor, config: CutConfig, generator: torch.Generator | None) -> torch.Tensor:
    """KeepAugment's rule: per sample, the first of KEEP_TRIES random Cutout squares (side `size`) that covers no
    pixel whose warped saliency exceeds `threshold`; an empty box where none does. (B, 4) int32 on the CPU.

    A summed-area table of the salient pixels counts each candidate's overlap in O(1)."""
    B, H, W = saliency.shape
    salient = (saliency > config.threshold).cpu().to(torch.int32)  # (B, H, W)
    table = torch.zeros(B, H + 1, W + 1, dtype=torch.int32)
    table[:, 1:, 1:] = salient.cumsum(1).cumsum(2)
    boxes = random_boxes(B * KEEP_TRIES, (H, W), config.size, generator).view(B, KEEP_TRIES, 4).long()
    r0, c0, r1, c1 = boxes.unbind(-1)  # each (B, tries)
    rows = torch.arange(B)[:, None]
    overlap = table[rows, r1, c1] - table[rows, r0, c1] - table[rows, r1, c0] + table[rows, r0, c0]  # (B, tries)
    clear = overlap == 0
    first = torch.where(clear.any(1), clear.float().argmax(1), -1)  # (B,) the first sparing try, or -1
    chosen = boxes[torch.arange(B), first.clamp_min(0)]  # (B, 4)
    chosen[first < 0] = 0
    return chosen.to(torch.int32)


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
        box[cut] = random_boxes(int(cut.sum()), image_hw, config.size, generator)
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
            box[cold] = random_boxes(int(cold.sum()), image_hw, config.cold_start_side, generator)
        if config.policy == "threshold":
            mode[use_map] = MODE_THRESHOLD
            tau[use_map] = _thresholds(maps, config, generator)[use_map]
        elif bool(use_map.any()):
            saliency = warp_to_crop(maps, windows, flips, image_hw)  # (B, H, W)
            flat = saliency.flatten(1)  # (B, H*W)
            if config.policy == "area":
                k = max(1, round(config.area * H * W)) if config.area > 0 else 0
                if k > 0:
                    kth_largest = flat.kthvalue(H * W - k + 1, dim=1).values.cpu()  # (B,)
                    mode[use_map] = MODE_AREA
                    tau[use_map] = kth_largest[use_map]
            elif config.policy == "keep":
                keep = _sparing_boxes(saliency, config, generator)  # (B, 4), or an empty box where none spares
                use_map &= (keep[:, 2] > keep[:, 0]) & (keep[:, 3] > keep[:, 1])
                mode[use_map] = MODE_BOX
                box[use_map] = keep[use_map]
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
