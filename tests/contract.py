"""The coordinate contract as a test oracle (docs/design.md, "Coordinates"), for images that encode their own
coordinates: red = round(row * s_y), green = round(col * s_x), blue = 200, with s = 250 / (side - 1), so one
source pixel spans s values (at least 5 for sides up to 51 px).

Output pixel (i, j) of an H x W view with window (y0, x0, y1, x1) and flip must show the source point
v = y0 + (i + 0.5) / H * (y1 - y0), u = x0 + (j' + 0.5) / W * (x1 - x0) (j' = W - 1 - j when flipped), in source
pixel units v * h - 0.5, clamped to the image's edge pixels. Bilinear resampling and any non-negative symmetric
antialiasing filter reproduce a linear ramp exactly, so what remains is quantisation: half a value of the
encoding (0.5 / s px), half a value again where the view is stored as uint8 before normalising, and 0.05 px for
float arithmetic. That is the tolerance; it is below the 0.5 px a half-pixel mistake moves a pixel centre.
"""

from __future__ import annotations

import numpy as np
import torch

SLACK = 0.05  # px: float arithmetic in resampling and normalisation


def encoded_image(height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 that encodes each pixel's own row and column."""
    image = np.full((height, width, 3), 200, dtype=np.uint8)
    image[..., 0] = np.round(np.arange(height) * scale(height))[:, None]
    image[..., 1] = np.round(np.arange(width) * scale(width))[None, :]
    return image


def scale(side: int) -> float:
    return 250.0 / max(side - 1, 1)


def decode(raw: torch.Tensor, src_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """raw (3, H, W) pixel values of a view -> the (row, column) source coordinates it shows, in px."""
    return raw[0].double() / scale(src_hw[0]), raw[1].double() / scale(src_hw[1])


def tolerance(src_hw: tuple[int, int], uint8_view: bool) -> tuple[float, float]:
    """(rows, columns) in px: the encoding's quantisation, the view's (if stored as uint8), and SLACK."""
    steps = 2 if uint8_view else 1
    return tuple(steps * 0.5 / scale(side) + SLACK for side in src_hw)


def expected_coordinates(window, flip: bool, out_hw, src_hw, mistake: str | None = None, crop_first: bool = False):
    """Source (rows (H,), cols (W,)) in px that the contract says the output shows, clamped to the image's edge
    pixels; with `crop_first` (a view cropped, then resized) to the crop's edge pixels inside the image, since the
    resampling filter of a cut-out crop sees nothing beyond it. That moves only the outermost half source pixel
    of such a view, by less than half a source pixel.

    `mistake` computes what a broken pipeline would show instead: "half-pixel" samples at i instead of i + 0.5,
    "align-corners" maps the crop's first and last pixel centres onto the output's."""
    (H, W), (h, w) = out_hw, src_hw
    y0, x0, y1, x1 = torch.as_tensor(window).double().tolist()

    def axis(lo, hi, out, src):
        i = torch.arange(out, dtype=torch.float64)
        if mistake == "align-corners":  # crop pixel centres lo*src + 0.5 ... hi*src - 0.5 onto 0 ... out - 1
            coords = lo * src + i * ((hi - lo) * src - 1) / max(out - 1, 1)
        else:
            offset = 0.0 if mistake == "half-pixel" else 0.5
            coords = (lo + (i + offset) / out * (hi - lo)) * src - 0.5
        first, last = (max(round(lo * src), 0), min(round(hi * src), src) - 1) if crop_first else (0, src - 1)
        return coords.clamp(first, last)

    rows, cols = axis(y0, y1, H, h), axis(x0, x1, W, w)
    if flip:
        cols = cols.flip(0)
    return rows, cols


def contract_errors(
    raw: torch.Tensor, window, flip: bool, src_hw, border: int = 0, mistake: str | None = None, crop_first: bool = False
):
    """Largest |shown - expected| in px over rows and columns. Compared: pixels inside the source image, minus
    `border` output px (antialiasing is clamped at a crop's edge) and, where the window reaches past the image,
    the pixels whose resampling footprint reaches the black outside (one source px, or one output px's worth)."""
    H, W = raw.shape[-2:]
    (h, w) = src_hw
    y0, x0, y1, x1 = torch.as_tensor(window).double().tolist()
    rows, cols = expected_coordinates(window, flip, (H, W), src_hw, mistake, crop_first)
    shown_r, shown_c = decode(raw, src_hw)

    def usable(lo, hi, out, src):  # (out,) which output positions of one axis to compare
        pos = (lo + (torch.arange(out, dtype=torch.float64) + 0.5) / out * (hi - lo)) * src  # source px, from 0
        reach = max(1.0, (hi - lo) * src / out) if (lo < 0 or hi > 1) else 0.0
        return (pos >= reach) & (pos <= src - reach)

    keep_r, keep_c = usable(y0, y1, H, h), usable(x0, x1, W, w)
    if flip:
        keep_c = keep_c.flip(0)
    keep = keep_r[:, None] & keep_c[None, :]
    keep[:border], keep[H - border :], keep[:, :border], keep[:, W - border :] = False, False, False, False
    if not keep.any():
        return 0.0, 0.0
    return (shown_r - rows[:, None])[keep].abs().max().item(), (shown_c - cols[None, :])[keep].abs().max().item()
