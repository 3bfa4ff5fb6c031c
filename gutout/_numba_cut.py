"""The Numba code of `gutout.cpu_kernel`, in its own module so that importing gutout never imports Numba.

Everything here is float32 arithmetic: the taps exactly as `gutout.warp.interp_taps` computes them; the
bilinear blend vertical first (one blended map row per output row, reused along it), where torch and the
CuPy kernel blend horizontally first, so values can differ in the last bit and decisions only at a threshold
tie. See `gutout.cpu_kernel` for why erased spans can be found without visiting every pixel.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

from .plan import MODE_AREA, MODE_BOX, MODE_THRESHOLD

f32 = np.float32
SQRT3 = f32(math.sqrt(3.0))
MASK32 = 0xFFFFFFFF


@njit(cache=True, nogil=True, inline="always")
def taps(lo, hi, out, n_in, i0, i1, w0, w1):
    """`gutout.warp.interp_taps` for one sample and one axis, into the given arrays."""
    for i in range(out):
        centre = (f32(i) + f32(0.5)) / f32(out)
        v = lo + centre * (hi - lo)
        inside = f32(1.0) if (v >= f32(0.0) and v <= f32(1.0)) else f32(0.0)
        pos = min(max(v * f32(n_in) - f32(0.5), f32(0.0)), f32(n_in - 1))
        f0 = min(np.floor(pos), f32(max(n_in - 2, 0)))
        frac = pos - f0
        i0[i] = int(f0)
        i1[i] = min(int(f0) + 1, n_in - 1)
        w0[i] = (f32(1.0) - frac) * inside
        w1[i] = frac * inside


@njit(cache=True, nogil=True, inline="always")
def passes(s, t, area):
    """A rule's decision at saliency `s`: MODE_AREA erases where s >= t and s > 0, MODE_THRESHOLD where s > t."""
    return (s >= t and s > f32(0.0)) if area else (s > t)


@njit(cache=True, nogil=True, inline="always")
def noise_at(flat_index, seed):
    """`gutout.cut.hash_noise` of one NCHW linear index (int64 arithmetic kept to 32 bits, as there)."""
    x = (flat_index + seed * 0x9E3779B9) & MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32  # may wrap past 2**63: the low 32 bits are still exact
    x ^= x >> 16
    u = f32(x >> 8) * f32(1.0 / 16777216.0)
    return (u * f32(2.0) - f32(1.0)) * SQRT3


@njit(cache=True, nogil=True)
def fill_spans(pixels, shape, strides, b, spans, n, fill, noise, seed):
    """Erase the first n spans (y, a, e) = columns [a, e) of row y of sample b, channel after channel.

    `pixels` is the batch's memory as one flat array and `strides` its (B, C, H, W) strides in elements, so
    any dense layout works. Channel-major order keeps the stores sequential, unsigned indices spare the
    negative-index check, and a unit stride (NCHW) lets the store loop vectorise: these writes are the
    kernel's main cost, at about memset speed.
    """
    _, C, H, W = shape
    sB, sC, sH, sW = strides
    for c in range(C):
        for k in range(n):
            y, a, e = spans[k, 0], spans[k, 1], spans[k, 2]
            fill_run(pixels, uint64(b * sB + c * sC + y * sH), ((b * C + c) * H + y) * W, a, e, sW, fill, noise, seed)


@njit(cache=True, nogil=True, inline="always")
def fill_run(pixels, row, logical, a, e, sW, fill, noise, seed):
    """Columns [a, e) of one channel's row at flat offset `row` (NCHW linear index `logical` for the noise)."""
    if noise:
        for x in range(a, e):
            pixels[row + uint64(x * sW)] = noise_at(logical + x, seed)
    elif sW == 1:
        for x in range(uint64(a), uint64(e)):
            pixels[row + x] = fill
    else:
        for x in range(a, e):
            pixels[row + uint64(x * sW)] = fill


@njit(cache=True, nogil=True, inline="always")
def add_span(spans, n, y, a, e):
    """Append columns [a, e) of row y, merged into the previous span when adjacent; returns the new count."""
    if n > 0 and spans[n - 1, 0] == y and spans[n - 1, 2] == a:
        spans[n - 1, 2] = e
        return n
    spans[n, 0], spans[n, 1], spans[n, 2] = y, a, e
    return n + 1


@njit(cache=True, nogil=True, inline="always")
def value(row, i0, i1, w0, w1, x):
    """The warped saliency at output column x of a row whose blend over the map's rows is `row`."""
    return row[i0[x]] * w0[x] + row[i1[x]] * w1[x]


@njit(cache=True, nogil=True)
def spans_from_saliency(saliency, b, t, area, spans):
    """Spans of sample b whose precomputed saliency (B, H, W) passes the rule; returns their count."""
    H, W = saliency.shape[1], saliency.shape[2]
    n = 0
    for y in range(H):
        x = 0
        while x < W:
            if passes(saliency[b, y, x], t, area):
                e = x + 1
                while e < W and passes(saliency[b, y, e], t, area):
                    e += 1
                spans[n, 0], spans[n, 1], spans[n, 2] = y, x, e
                n += 1
                x = e
            x += 1
    return n


@njit(cache=True, nogil=True)
def spans_from_map(maps, b, window, flip, t, area, H, W, spans):
    """Spans of sample b where its canonical map, warped into the (flipped) crop `window`, passes the rule.

    Along a row the warp blends two taps whose weights are monotone in the column, so on a *segment* (a run
    of columns with one tap pair, on one side of the image's edge) the saliency is monotone: the segment's
    tap values decide it whole, or its two end pixels do, or a bisection finds its one boundary.
    """
    h, w = maps.shape[1], maps.shape[2]
    yi0, yi1 = np.empty(H, np.int64), np.empty(H, np.int64)
    yw0, yw1 = np.empty(H, np.float32), np.empty(H, np.float32)
    ci0, ci1 = np.empty(W, np.int64), np.empty(W, np.int64)  # taps of each crop column
    cw0, cw1 = np.empty(W, np.float32), np.empty(W, np.float32)
    xi0, xi1 = np.empty(W, np.int64), np.empty(W, np.int64)  # taps of each output column (flip applied)
    xw0, xw1 = np.empty(W, np.float32), np.empty(W, np.float32)
    taps(window[0], window[2], H, h, yi0, yi1, yw0, yw1)
    taps(window[1], window[3], W, w, ci0, ci1, cw0, cw1)
    for x in range(W):  # the flip is applied after the crop: output column x reads crop column W-1-x
        src = W - 1 - x if flip else x
        xi0[x], xi1[x], xw0[x], xw1[x] = ci0[src], ci1[src], cw0[src], cw1[src]
    seg_start = np.empty(W + 1, np.int64)
    n_seg = 0
    for x in range(W):
        outside = xw0[x] + xw1[x] == 0
        if x == 0 or xi0[x] != xi0[x - 1] or xi1[x] != xi1[x - 1] or outside != (xw0[x - 1] + xw1[x - 1] == 0):
            seg_start[n_seg] = x
            n_seg += 1
    seg_start[n_seg] = W
    row = np.empty(w, np.float32)
    n = 0
    for y in range(H):
        peak = f32(0.0)  # outside the image the saliency is 0, so 0 bounds the row too
        for k in range(w):
            row[k] = maps[b, yi0[y], k] * yw0[y] + maps[b, yi1[y], k] * yw1[y]
            peak = max(peak, row[k])
        if not passes(peak, t, area):
            continue  # every value in this row is a blend of row[] (or 0): none passes
        for s in range(n_seg):
            xs, last = seg_start[s], seg_start[s + 1] - 1
            inside = xw0[xs] + xw1[xs] != 0
            low = min(row[xi0[xs]], row[xi1[xs]]) if inside else f32(0.0)
            high = max(row[xi0[xs]], row[xi1[xs]]) if inside else f32(0.0)
            if passes(low, t, area):
                n = add_span(spans, n, y, xs, last + 1)
                continue
            if not passes(high, t, area):
                continue
            first_in = passes(value(row, xi0, xi1, xw0, xw1, xs), t, area)
            last_in = passes(value(row, xi0, xi1, xw0, xw1, last), t, area)
            if first_in and last_in:
                n = add_span(spans, n, y, xs, last + 1)
            elif first_in or last_in:  # one boundary: bisect for the first column that differs from the first
                lo, hi = xs, last
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if passes(value(row, xi0, xi1, xw0, xw1, mid), t, area) == first_in:
                        lo = mid
                    else:
                        hi = mid
                n = add_span(spans, n, y, xs, hi) if first_in else add_span(spans, n, y, hi, last + 1)
    return n


@njit(cache=True, nogil=True, inline="always")
def normalise_run(source, pixels, row, b, c, y, a, e, sW, s, o):
    """Columns [a, e) of row y, channel c of sample b: uint8 `source` as float32 `source * s + o`."""
    if sW == 1:
        for x in range(uint64(a), uint64(e)):
            pixels[row + x] = f32(source[b, c, y, x]) * s + o
    else:
        for x in range(a, e):
            pixels[row + uint64(x * sW)] = f32(source[b, c, y, x]) * s + o


@njit(cache=True, nogil=True)
def normalise_sample(source, pixels, shape, strides, b, scale, bias, spans, n, fill, noise, seed):
    """Sample b of uint8 `source` (B, C, H, W) as float32 `source * scale[c] + bias[c]`, except the first n
    spans (in row order), which get the fill: every pixel is written once, so the cut costs no pass of its
    own. Channel after channel, so that the stores stay sequential."""
    _, C, H, W = shape
    sB, sC, sH, sW = strides
    for c in range(C):
        s, o = scale[c], bias[c]
        k = 0
        for y in range(H):
            row = uint64(b * sB + c * sC + y * sH)
            x = 0
            while k < n and spans[k, 0] == y:
                a, e = spans[k, 1], spans[k, 2]
                normalise_run(source, pixels, row, b, c, y, x, a, sW, s, o)
                fill_run(pixels, row, ((b * C + c) * H + y) * W, a, e, sW, fill, noise, seed)
                x = e
                k += 1
            normalise_run(source, pixels, row, b, c, y, x, W, sW, s, o)


@njit(cache=True, nogil=True)
def cut_batch(
    pixels,
    shape,
    strides,
    maps,
    saliency,
    windows,
    flips,
    mode,
    tau,
    box,
    fill,
    noise,
    seed,
    erased,
    spans,
    source,
    scale,
    bias,
):
    """Apply a CutPlan (mode, tau, box per sample) to a batch in place; erased[b] = pixel count.

    The batch is `pixels`, its memory as a flat array, with `shape` (B, C, H, W) and `strides` in elements.
    With a uint8 `source` (B, C, H, W) the batch is written from it, normalised (`source * scale + bias`),
    the fill going straight into the erased spans: one pass, each pixel written once.
    `saliency` (B, H, W) is the plan's warped saliency when planning computed it (the `area` rule's threshold
    is one of its values, so deciding on those very values keeps the ties exact), else an empty array.
    `spans` (H * W, 3) int64 is scratch space for one sample's spans (y, a, e): at most one per pixel.
    """
    B, _, H, W = shape
    for b in range(B):
        m = mode[b]
        n = 0
        if m == MODE_BOX:
            r0, c0 = max(box[b, 0], 0), max(box[b, 1], 0)
            r1, c1 = min(box[b, 2], H), min(box[b, 3], W)
            if c1 > c0:
                for y in range(r0, r1):
                    n = add_span(spans, n, y, c0, c1)
        elif m == MODE_THRESHOLD or m == MODE_AREA:
            area = m == MODE_AREA
            if saliency.shape[0] == B:
                n = spans_from_saliency(saliency, b, tau[b], area, spans)
            else:
                n = spans_from_map(maps, b, windows[b], flips[b], tau[b], area, H, W, spans)
        count = 0
        for k in range(n):
            count += spans[k, 2] - spans[k, 1]
        if source.shape[0] == B:
            normalise_sample(source, pixels, shape, strides, b, scale, bias, spans, n, fill, noise, seed)
        else:
            fill_spans(pixels, shape, strides, b, spans, n, fill, noise, seed)
        erased[b] = count
