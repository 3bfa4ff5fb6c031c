"""The coordinate contract (docs/design.md) as separable interpolation matrices.

A crop window has no rotation, so warping a canonical-frame map (B, h, w) into an H x W crop is
separable: `Ry @ map @ Rx^T` with one (H, h) and one (W, w) matrix per sample. Each row of a matrix holds the two
bilinear weights of one output pixel centre (half-pixel convention, `grid_sample(align_corners=False)`),
clamped to the edge inside [0, 1] and all zero outside it (padding carries no saliency).
The same matrices, built for the inverse window, carry a crop's CAM back into the canonical frame.
"""

from __future__ import annotations

import torch


def interp_taps(
    lo: torch.Tensor, hi: torch.Tensor, out_size: int, in_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two bilinear taps of each output cell: (i0, i1) long and (w0, w1) float32, each (B, out_size).

    Output cell i (centre) sits at the source coordinate v = lo + (i + 0.5) / out_size * (hi - lo),
    where the source grid of `in_size` cells spans [0, 1]. Both weights are 0 where v is outside [0, 1].
    The CuPy kernel repeats this arithmetic, so both paths agree except for float rounding at a threshold.
    """
    lo = lo.to(torch.float32)[:, None]  # (B, 1)
    hi = hi.to(torch.float32)[:, None]
    centres = (torch.arange(out_size, device=lo.device, dtype=torch.float32) + 0.5) / out_size  # (out,)
    v = lo + centres * (hi - lo)  # (B, out) source coordinate, in [0, 1] when inside
    inside = ((v >= 0) & (v <= 1)).to(torch.float32)
    pos = (v * in_size - 0.5).clamp(0, in_size - 1)  # source pixel units, edge-clamped
    i0 = pos.floor().clamp(max=max(in_size - 2, 0))
    frac = pos - i0  # in [0, 1]; 1 only at the last cell
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (1 - frac) * inside, frac * inside


def interp_matrix(lo: torch.Tensor, hi: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """The taps of `interp_taps` as dense sampling matrices (B, out_size, in_size), float32."""
    i0, i1, w0, w1 = interp_taps(lo, hi, out_size, in_size)
    cols = torch.arange(in_size, device=i0.device)  # (in,)
    return w0[..., None] * (cols == i0[..., None]) + w1[..., None] * (cols == i1[..., None])


def crop_matrices(
    windows: torch.Tensor, flips: torch.Tensor, out_hw: tuple[int, int], map_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ry (B, H, h), Rx (B, W, w)) taking a canonical map to the pixels of each (flipped) crop."""
    windows = windows.to(torch.float32)
    y0, x0, y1, x1 = windows.unbind(-1)
    ry = interp_matrix(y0, y1, out_hw[0], map_hw[0])
    rx = interp_matrix(x0, x1, out_hw[1], map_hw[1])
    # The flip is applied after the crop: output column j reads crop column W - 1 - j.
    rx = torch.where(flips.to(torch.bool).view(-1, 1, 1), rx.flip(1), rx)
    return ry, rx


def warp_to_crop(
    maps: torch.Tensor,
    windows: torch.Tensor,
    flips: torch.Tensor,
    out_hw: tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Canonical-frame maps (B, h, w) -> saliency (B, H, W) on each sample's crop, float32.

    Two small batched matmuls (50x faster on a CPU than the equivalent gathers). Where CUDA matmuls may
    round through TF32, the product runs in float64 instead: a TF32 rounding would move values across
    a threshold and break the agreement with the CuPy kernel. `out` (B, H, W) float32 receives the result.
    """
    windows = windows.to(device=maps.device)
    flips = flips.to(device=maps.device)
    ry, rx = crop_matrices(windows, flips, out_hw, tuple(maps.shape[-2:]))
    exact = torch.float64 if maps.is_cuda and torch.backends.cuda.matmul.allow_tf32 else torch.float32
    ry, rx, maps = ry.to(exact), rx.to(exact), maps.to(exact)
    along_x = maps @ rx.transpose(1, 2)  # (B, h, w) @ (B, w, W) -> (B, h, W)
    if out is not None and exact == torch.float32:
        return torch.bmm(ry, along_x, out=out)  # (B, H, h) @ (B, h, W)
    result = (ry @ along_x).to(torch.float32)
    return out.copy_(result) if out is not None else result


def warp_to_canonical(
    crop_maps: torch.Tensor, windows: torch.Tensor, flips: torch.Tensor, map_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop's maps (B, Hc, Wc) -> (canonical maps (B, h, w), covered (B, h, w) bool).

    The inverse of `warp_to_crop`, for harvesting CAMs from training views: canonical cell centres that
    fall outside the crop window are not observed (`covered` is False there and the map is 0).
    """
    windows = windows.to(device=crop_maps.device, dtype=torch.float32)
    flips = flips.to(device=crop_maps.device, dtype=torch.bool)
    crop_maps = torch.where(flips.view(-1, 1, 1), crop_maps.flip(-1), crop_maps).to(torch.float32)
    y0, x0, y1, x1 = windows.unbind(-1)
    # Canonical coordinate c lies at (c - y0) / (y1 - y0) in the crop's own [0, 1] frame.
    ry = interp_matrix(-y0 / (y1 - y0), (1 - y0) / (y1 - y0), map_hw[0], crop_maps.shape[-2])
    rx = interp_matrix(-x0 / (x1 - x0), (1 - x0) / (x1 - x0), map_hw[1], crop_maps.shape[-1])
    maps = ry @ crop_maps @ rx.transpose(1, 2)  # (B, h, w)
    covered = (ry.sum(-1) > 0)[:, :, None] & (rx.sum(-1) > 0)[:, None, :]
    return maps, covered
