"""Normalising uint8 batches into float32: the fused CPU kernel where it runs, else torch, with one arithmetic
(`gutout.affine`), so either path gives the same bits."""

from __future__ import annotations

import torch

from . import cpu_kernel
from .affine import affine, check_pair


def normalise_uint8(source: torch.Tensor, out: torch.Tensor, mean, std) -> torch.Tensor:
    """out = (uint8 `source` - mean) / std per channel (mean/std in the source's units); returns `out`.

    The fused CPU kernel (one pass) where it runs, else torch with the same arithmetic.
    """
    if cpu_kernel.supports(out):  # it checks the pair itself
        return cpu_kernel.normalise_and_cut_numba(source, out, mean, std, None, None, None, None, 0.0)[0]
    check_pair(source, out)
    scale, bias = affine(mean, std, source.shape[1])
    return torch.mul(source, scale.view(-1, 1, 1), out=out).add_(bias.view(-1, 1, 1))
