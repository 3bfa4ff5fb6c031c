import math

import pytest
import torch

from gutout import CutConfig, cut
from gutout.config import ConfigError
from gutout.cut import MODE_AREA, MODE_BOX, MODE_THRESHOLD, apply_plan_torch, hash_noise, plan_cuts
from gutout.warp import warp_to_crop
from tests.conftest import random_windows


def batch(B=8, C=3, H=24, W=20, seed=0, pad=0.2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, C, H, W, generator=g) + 5.0  # no pixel equals the fill by accident
    maps = torch.rand(B, 7, 7, generator=g)
    windows = random_windows(B, g, pad=pad)
    flips = torch.rand(B, generator=g) < 0.5
    return images, maps, windows, flips


def erased_mask(before, after):
    changed = before != after  # (B, C, H, W)
    assert bool((changed.any(1) == changed.all(1)).all()), "a pixel was erased in some channels only"
    return changed.any(1)


def naive_erase_mask(plan, maps, windows, flips, H, W):
    """Per-pixel loops straight from docs/design.md: the plain path the batched one is tested against."""
    B = plan.mode.shape[0]
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    for b in range(B):
        y0, x0, y1, x1 = windows[b].tolist()
        h, w = maps.shape[1:]
        for i in range(H):
            for j in range(W):
                mode = int(plan.mode[b])
                if mode == MODE_BOX:
                    r0, c0, r1, c1 = plan.box[b].tolist()
                    mask[b, i, j] = r0 <= i < r1 and c0 <= j < c1
                    continue
                if mode not in (MODE_THRESHOLD, MODE_AREA):
                    continue
                jj = W - 1 - j if bool(flips[b]) else j
                v = y0 + (i + 0.5) / H * (y1 - y0)
                u = x0 + (jj + 0.5) / W * (x1 - x0)
                s = 0.0
                if 0 <= v <= 1 and 0 <= u <= 1:
                    py = min(max(v * h - 0.5, 0), h - 1)
                    px = min(max(u * w - 0.5, 0), w - 1)
                    r, c = min(math.floor(py), h - 2), min(math.floor(px), w - 2)
                    fy, fx = py - r, px - c
                    m = maps[b].double()
                    s = float(
                        (1 - fy) * ((1 - fx) * m[r, c] + fx * m[r, c + 1])
                        + fy * ((1 - fx) * m[r + 1, c] + fx * m[r + 1, c + 1])
                    )
                tau = float(plan.tau[b])
                mask[b, i, j] = s > tau if mode == MODE_THRESHOLD else (s >= tau and s > 0)
    return mask


@pytest.mark.parametrize("policy", ["threshold", "area", "box", "cutout"])
def test_batched_cut_matches_per_pixel_loops(policy):
    images, maps, windows, flips = batch(B=6, H=16, W=12)
    cfg = CutConfig(policy=policy, threshold=0.6, area=0.3, size=0.4)
    plan = plan_cuts(maps, None, windows, flips, (16, 12), cfg, torch.Generator().manual_seed(3))
    after, erased = apply_plan_torch(images.clone(), plan, maps, windows, flips, 0.0)
    mask = erased_mask(images, after)
    naive = naive_erase_mask(plan, maps, windows, flips, 16, 12)
    if policy in ("threshold", "area"):  # float rounding only matters within 1e-6 of the threshold
        sal = warp_to_crop(maps, windows, flips, (16, 12))
        ties = (sal - plan.tau.view(-1, 1, 1)).abs() < 1e-6
        assert bool(((mask == naive) | ties).all())
    else:
        assert torch.equal(mask, naive)
    assert torch.allclose(erased, mask.flatten(1).float().mean(1))
    assert bool((after[mask[:, None].expand_as(after)] == 0).all())


def test_only_erased_pixels_change_and_every_channel_gets_fill():
    images, maps, windows, flips = batch()
    out, erased = cut(images, maps, windows, flips, policy="threshold", threshold=0.5, fill=-1.5)
    mask = erased_mask(images, out)
    assert bool(mask.any()) and bool((~mask).any())
    assert bool((out.permute(1, 0, 2, 3)[:, mask] == -1.5).all())
    assert torch.equal(out.permute(1, 0, 2, 3)[:, ~mask], images.permute(1, 0, 2, 3)[:, ~mask])
    assert not torch.equal(out, images)  # not in place by default...
    same, _ = cut(images, maps, windows, flips, policy="threshold", threshold=0.5, fill=-1.5, inplace=True)
    assert same.data_ptr() == images.data_ptr() and torch.equal(same, out)  # ...unless asked


def test_threshold_erases_exactly_the_salient_region():
    # Saliency 1 in the left half of the canonical frame, 0 in the right half; whole-image windows.
    maps = torch.zeros(2, 8, 8)
    maps[:, :, :4] = 1.0
    windows = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    flips = torch.tensor([False, True])
    images = torch.ones(2, 1, 16, 16)
    out, _ = cut(images, maps, windows, flips, policy="threshold", threshold=0.5)
    # Bilinear at 16 px: columns 0..6 see saliency > 0.5 (column 7 sits at exactly 0.5 and is kept).
    assert bool((out[0, 0, :, :8] == 0).all()) and bool((out[0, 0, :, 8:] == 1).all())
    assert torch.equal(out[1], out[0].flip(-1)), "the flip must mirror the cut"


def test_crop_window_selects_the_right_part_of_the_map():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 1.0  # the top-left quarter of the top-left quarter is salient
    images = torch.ones(1, 1, 8, 8)
    top_left = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    bottom_right = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    no_flip = torch.zeros(1, dtype=torch.bool)
    out, erased = cut(images, maps, top_left, no_flip, policy="threshold", threshold=0.5)
    assert float(erased) > 0 and bool((out[0, 0, :4, :4] == 0).any()) and bool((out[0, 0, 4:, 4:] == 1).all())
    out, erased = cut(images, maps, bottom_right, no_flip, policy="threshold", threshold=0.5)
    assert float(erased) == 0


def test_padding_is_never_erased_by_saliency():
    maps = torch.ones(1, 7, 7)
    window = torch.tensor([[-4 / 28, -4 / 28, 1.0, 1.0]])
    out, _ = cut(torch.ones(1, 1, 32, 32), maps, window, torch.zeros(1, dtype=torch.bool), threshold=0.0)
    assert bool((out[0, 0, :4] == 1).all()) and bool((out[0, 0, :, :4] == 1).all())
    assert bool((out[0, 0, 4:, 4:] == 0).all())


def test_area_policy_erases_the_requested_fraction_most_salient_first():
    images, maps, windows, flips = batch(B=8, H=32, W=32, pad=0.0)
    out, erased = cut(images, maps, windows, flips, policy="area", area=0.3)
    mask = erased_mask(images, out)
    assert torch.allclose(erased, torch.full((8,), round(0.3 * 1024) / 1024))
    sal = warp_to_crop(maps, windows, flips, (32, 32)).flatten(1)
    kept_max = torch.where(mask.flatten(1), -1.0, sal).amax(1)
    erased_min = torch.where(mask.flatten(1), sal, 2.0).amin(1)
    assert bool((erased_min >= kept_max).all())


def test_box_policy_centres_on_the_saliency_peak():
    maps = torch.zeros(1, 7, 7)
    maps[0, 5, 2] = 1.0
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    out, erased = cut(torch.ones(1, 1, 28, 28), maps, full, torch.zeros(1, dtype=torch.bool), policy="box", size=0.25)
    rows, cols = (out[0, 0] == 0).nonzero(as_tuple=True)
    assert float(erased) == 49 / 784
    # Cell (5, 2) covers rows 20..23 and columns 8..11: the peak is one of its two central pixels.
    assert (rows.float().mean() - 21.5).abs() <= 0.5 and (cols.float().mean() - 9.5).abs() <= 0.5


def test_box_sample_follows_saliency():
    maps = torch.zeros(64, 7, 7)
    maps[:, 1, 5] = 1.0  # all the mass in one cell: sampled centres fall near it
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(64, 4)
    out, _ = cut(
        torch.ones(64, 1, 28, 28),
        maps,
        full,
        torch.zeros(64, dtype=torch.bool),
        policy="box",
        box_center="sample",
        size=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    rows, cols = (out[:, 0] == 0).nonzero(as_tuple=True)[1:]
    assert rows.float().mean().sub(5.5).abs() < 2 and cols.float().mean().sub(21.5).abs() < 2


def test_all_zero_map_means_nothing_to_cut():
    images, _, windows, flips = batch(B=4)
    zeros = torch.zeros(4, 7, 7)
    for policy in ("threshold", "area", "box"):
        out, erased = cut(images, zeros, windows, flips, policy=policy, threshold=0.0)
        assert torch.equal(out, images) and float(erased.sum()) == 0, policy


def test_cutout_and_apply_probability():
    images = torch.ones(400, 1, 20, 20)
    out, erased = cut(images, policy="cutout", size=0.5, generator=torch.Generator().manual_seed(0))
    assert float(erased.max()) == 0.25 and float(erased.min()) > 0  # clipped at the edges, never empty
    out, erased = cut(images, policy="cutout", size=0.5, p=0.5, generator=torch.Generator().manual_seed(0))
    assert 150 < int((erased > 0).sum()) < 250
    out, erased = cut(images, policy="cutout", p=0.0)
    assert torch.equal(out, images)
    out, erased = cut(images, policy="none")
    assert torch.equal(out, images) and float(erased.sum()) == 0


def test_cold_start_uses_cutout_of_the_same_area():
    images, maps, windows, flips = batch(B=64, H=20, W=20)
    valid = torch.tensor([True, False] * 32)
    out, erased = cut(images, maps, windows, flips, valid=valid, policy="area", area=0.25)
    # A 10 x 10 box, clipped where its random centre lies near an edge.
    assert bool((erased[~valid] > 0).all()) and float(erased[~valid].max()) == 0.25
    out, erased = cut(images, maps, windows, flips, valid=valid, policy="area", cold_start="none")
    assert torch.equal(out[~valid], images[~valid]) and bool((erased[valid] > 0).all())


def test_noise_fill_is_unit_variance_and_reproducible():
    images, maps, windows, flips = batch(B=4, H=64, W=64)
    a, _ = cut(images, maps, windows, flips, fill="noise", threshold=0.2, generator=torch.Generator().manual_seed(1))
    b, _ = cut(images, maps, windows, flips, fill="noise", threshold=0.2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    noise = a[a != images]
    assert noise.numel() > 1000 and abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.05
    values = hash_noise(torch.arange(1 << 16), seed=7)
    assert float(values.min()) >= -math.sqrt(3) and float(values.max()) < math.sqrt(3)


def test_half_precision_images():
    images, maps, windows, flips = batch()
    ref, e32 = cut(images, maps, windows, flips, threshold=0.5)
    half, e16 = cut(images.half(), maps, windows, flips, threshold=0.5)
    assert half.dtype == torch.float16 and torch.equal(erased_mask(images.half(), half), erased_mask(images, ref))
    assert torch.equal(e16, e32)


def test_bad_inputs_name_the_problem():
    images, maps, windows, flips = batch(B=4)
    with pytest.raises(ConfigError, match="policy='blur'"):
        cut(images, maps, windows, flips, policy="blur")
    with pytest.raises(ConfigError, match="unknown CutConfig key.*treshold"):
        cut(images, maps, windows, flips, treshold=0.3)
    with pytest.raises(ConfigError, match="area=1.5"):
        CutConfig(area=1.5)
    with pytest.raises(ValueError, match="maps must be"):
        cut(images, maps[:2], windows, flips)
    with pytest.raises(ValueError, match="windows must be"):
        cut(images, maps, windows[:, :2], flips)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        cut(images[0], maps, windows, flips)
    with pytest.raises(ValueError, match="floating point"):
        cut(images.to(torch.uint8), maps, windows, flips)
    with pytest.raises(ValueError, match="kernel 'cupy' cannot run here.*not CUDA"):
        cut(images, maps, windows, flips, kernel="cupy")


def test_erasing_follows_random_erasing_semantics():
    images = torch.ones(2000, 1, 32, 32)
    out, erased = cut(images, policy="erasing", p=1.0, generator=torch.Generator().manual_seed(0))
    mask = (out == 0)[:, 0]
    hit = erased > 0
    assert float(hit.float().mean()) > 0.95  # RandomErasing gives up only when 10 tries fail
    # Inside the image, never clipped, within the area range (rounding allows a little slack).
    assert float(erased[hit].min()) >= 0.015 and float(erased.max()) <= 0.36
    rows, cols = mask.any(2), mask.any(1)
    heights, widths = rows.sum(1)[hit].float(), cols.sum(1)[hit].float()
    assert torch.equal((heights * widths), erased[hit] * 1024)  # a solid rectangle
    aspect = heights / widths
    assert float(aspect.min()) >= 0.25 and float(aspect.max()) <= 4.0


def brute_force_saliency(maps, windows, flips, H, W):
    """(B, H, W) saliency of each crop pixel by full-resolution `grid_sample`, straight from the coordinate contract
    (docs/design.md): pixel centres, the flip after the crop, bilinear with align_corners=False, edge-clamped inside
    the image, 0 outside. Shares no code with gutout.warp."""
    import torch.nn.functional as F

    i = (torch.arange(H, dtype=torch.float64) + 0.5) / H  # (H,)
    j = (torch.arange(W, dtype=torch.float64) + 0.5) / W  # (W,)
    y0, x0, y1, x1 = windows.double().unbind(1)  # each (B,)
    v = y0[:, None] + i[None] * (y1 - y0)[:, None]  # (B, H)
    u = x0[:, None] + j[None] * (x1 - x0)[:, None]  # (B, W) before the flip
    u = torch.where(flips[:, None], u.flip(1), u)
    grid = torch.stack(torch.broadcast_tensors(2 * u[:, None, :] - 1, 2 * v[:, :, None] - 1), dim=-1)  # (B, H, W, 2)
    sal = F.grid_sample(maps.double()[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((v >= 0) & (v <= 1))[:, :, None] & ((u >= 0) & (u <= 1))[:, None, :]
    return (sal[:, 0] * inside).float()


@pytest.mark.parametrize("seed", range(6))
def test_planned_area_thresholds_and_box_peaks_match_a_brute_force_oracle(seed):
    g = torch.Generator().manual_seed(100 + seed)
    B, H, W = 16, int(torch.randint(9, 40, (1,), generator=g)), int(torch.randint(9, 40, (1,), generator=g))
    maps = torch.rand(B, 7, 7, generator=g) ** 3  # peaky, as trained Grad-CAM maps are
    windows = random_windows(B, g, pad=0.25)
    flips = torch.rand(B, generator=g) < 0.5
    sal = brute_force_saliency(maps, windows, flips, H, W).flatten(1)  # (B, H * W)
    area = float(torch.rand(1, generator=g) * 0.5 + 0.05)
    plan = plan_cuts(maps, None, windows, flips, (H, W), CutConfig(policy="area", area=area, p=1.0))
    k = max(1, round(area * H * W))
    kth_largest = sal.sort(dim=1, descending=True).values[:, k - 1]
    assert torch.allclose(plan.tau, kth_largest, atol=1e-5), (plan.tau - kth_largest).abs().max()
    side = float(torch.rand(1, generator=g) * 0.5 + 0.1)
    plan = plan_cuts(maps, None, windows, flips, (H, W), CutConfig(policy="box", size=side, p=1.0))
    has_peak = sal.amax(1) > 0
    assert torch.equal(plan.mode == MODE_BOX, has_peak)  # an all-zero crop (in the padding) is not cut
    sh, sw = round(side * H), round(side * W)

    def box_at(pixel):  # the square of side (sh, sw) centred on a pixel, clipped to the crop
        cy, cx = pixel // W, pixel % W
        return [max(cy - sh // 2, 0), max(cx - sw // 2, 0), min(cy - sh // 2 + sh, H), min(cx - sw // 2 + sw, W)]

    for b in torch.nonzero(has_peak).flatten().tolist():
        peaks = torch.nonzero(sal[b] >= sal[b].max() - 1e-5).flatten().tolist()  # the maximum, and exact ties
        assert plan.box[b].tolist() in [box_at(p) for p in peaks], (b, plan.box[b].tolist(), box_at(peaks[0]))


def test_sigma_and_range_thresholds_are_per_sample():
    images, maps, windows, flips = batch(B=16)
    sigma = plan_cuts(maps, None, windows, flips, (24, 20), CutConfig(threshold_rule="sigma", k=1.5, p=1.0))
    flat = maps.flatten(1)
    assert torch.allclose(sigma.tau, flat.mean(1) + 1.5 * flat.std(1, unbiased=False))
    drawn = plan_cuts(
        maps,
        None,
        windows,
        flips,
        (24, 20),
        CutConfig(threshold_rule="range", threshold_range=(0.2, 0.5), p=1.0),
        torch.Generator().manual_seed(0),
    )
    assert bool(((drawn.tau >= 0.2) & (drawn.tau <= 0.5)).all()) and drawn.tau.std() > 0.03
    assert bool((drawn.mode == MODE_THRESHOLD).all())
    with pytest.raises(ConfigError, match="threshold_range"):
        CutConfig(threshold_rule="range", threshold_range=(0.6, 0.2))


def test_keep_cuts_a_square_that_spares_the_salient_pixels():
    g = torch.Generator().manual_seed(4)
    B, H, W = 32, 24, 20
    maps = torch.zeros(B, 7, 7)
    maps[:, 2:5, 2:5] = 1.0  # a salient centre
    maps[-4:] = 1.0  # salient everywhere: no square can spare it
    windows = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(B, 4)
    flips = torch.zeros(B, dtype=torch.bool)
    images = torch.randn(B, 1, H, W, generator=g) + 5
    cfg = CutConfig(policy="keep", size=0.3, threshold=0.5, p=1.0)
    plan = plan_cuts(maps, None, windows, flips, (H, W), cfg, torch.Generator().manual_seed(1))
    out, erased = apply_plan_torch(images.clone(), plan, maps, windows, flips, 0.0)
    salient = warp_to_crop(maps, windows, flips, (H, W)) > 0.5
    cut_pixels = (out != images)[:, 0]
    assert not bool((cut_pixels & salient).any())  # nothing salient was erased
    assert bool((erased[:-4] > 0).all()) and bool((erased[-4:] == 0).all())  # a spare square, or no cut at all
    assert float(erased[:-4].mean()) == pytest.approx(round(0.3 * H) * round(0.3 * W) / (H * W), rel=0.3)
