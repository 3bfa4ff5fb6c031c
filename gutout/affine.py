"""The one normalising arithmetic: `(x - mean) / std` as `x * scale + bias`, float32 `scale = 1 / std` and
`bias = -mean / std` computed in float64. The fused CPU kernel does exactly this per pixel, and so does the torch
path, so a batch normalised on either path, cut or not, is the same to the bit.
"""

from __future__ import annotations

import torch


def affine(mean, std, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), each (channels,) float32, with x * scale + bias == (x - mean) / std up to float rounding.

    `mean` and `std` hold one value per channel, or one for all; any other length is an error (the fused
    kernel indexes them per channel without bounds checks).
    """
    values = []
    for name, value in (("mean", mean), ("std", std)):
        value = torch.as_tensor(value, dtype=torch.float64).flatten()
        if value.numel() not in (1, channels):
            raise ValueError(f"normalise: {name} has {value.numel()} values for {channels} channels")
        values.append(value.expand(channels))
    mean, std = values
    if not bool((std > 0).all()):
        raise ValueError(f"normalise: std must be positive, got {std.tolist()}")
    scale = (1.0 / std).to(torch.float32)
    bias = (-mean / std).to(torch.float32)
    return scale, bias


def check_pair(source: torch.Tensor, out: torch.Tensor) -> None:
    """`source` uint8 and `out` float32, both (B, C, H, W) of one shape: anything else is an error naming it."""
    if source.dtype != torch.uint8 or source.dim() != 4:
        raise ValueError(f"normalise: source must be uint8 (B, C, H, W), got {source.dtype} {tuple(source.shape)}")
    if out.dtype != torch.float32 or tuple(out.shape) != tuple(source.shape):
        raise ValueError(
            f"normalise: out must be float32 of the source's shape {tuple(source.shape)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
