import torch
import torch.nn.functional as F

from gutout.warp import crop_matrices, warp_to_canonical, warp_to_crop
from tests.conftest import random_windows


def grid_sample_reference(maps, windows, flips, hw):
    """docs/design.md's contract written with grid_sample: pixel centres, bilinear, border clamp, 0 outside."""
    B = maps.shape[0]
    H, W = hw
    y0, x0, y1, x1 = windows.unbind(-1)
    i = torch.arange(H) + 0.5
    j = torch.arange(W).float()
    jj = torch.where(flips[:, None], W - 1 - j, j) + 0.5
    v = y0[:, None] + i / H * (y1 - y0)[:, None]  # (B, H)
    u = x0[:, None] + jj / W * (x1 - x0)[:, None]  # (B, W)
    grid = torch.stack([u[:, None, :].expand(B, H, W), v[:, :, None].expand(B, H, W)], -1) * 2 - 1
    out = F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    inside = ((v >= 0) & (v <= 1))[:, :, None] & ((u >= 0) & (u <= 1))[:, None, :]
    return out * inside


def test_warp_matches_grid_sample_contract():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(16, 7, 5, generator=g)
    windows = random_windows(16, g, pad=0.3)
    flips = torch.rand(16, generator=g) < 0.5
    for hw in [(24, 24), (13, 31), (1, 1)]:
        ours = warp_to_crop(maps, windows, flips, hw)
        ref = grid_sample_reference(maps, windows, flips, hw)
        assert (ours - ref).abs().max() < 1e-5, hw


def test_gather_warp_equals_separable_matrices():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(8, 7, 7, generator=g)
    windows = random_windows(8, g, pad=0.2)
    flips = torch.rand(8, generator=g) < 0.5
    ry, rx = crop_matrices(windows, flips, (20, 17), (7, 7))
    assert torch.allclose(warp_to_crop(maps, windows, flips, (20, 17)), ry @ maps @ rx.transpose(1, 2), atol=1e-6)


def test_identity_window_at_map_resolution_is_exact():
    maps = torch.rand(3, 7, 7)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)
    assert torch.equal(warp_to_crop(maps, full, torch.zeros(3, dtype=torch.bool), (7, 7)), maps)
    flipped = warp_to_crop(maps, full, torch.ones(3, dtype=torch.bool), (7, 7))
    assert torch.equal(flipped, maps.flip(-1))


def test_canonical_roundtrip_and_coverage():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(4, 7, 7, generator=g)
    flips = torch.tensor([False, True, False, True])
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4)
    back, covered = warp_to_canonical(warp_to_crop(maps, full, flips, (7, 7)), full, flips, (7, 7))
    assert torch.allclose(back, maps, atol=1e-6) and bool(covered.all())
    # A crop of the top-left quarter only sees the top-left canonical cells.
    quarter = torch.tensor([[0.0, 0.0, 0.5, 0.5]]).expand(4, 4)
    _, covered = warp_to_canonical(torch.rand(4, 14, 14), quarter, flips, (7, 7))
    assert covered[:, :3, :3].all() and not covered[:, 4:, :].any() and not covered[:, :, 4:].any()


def test_pad_window_outside_image_is_zero():
    maps = torch.ones(1, 7, 7)
    # A 32-px crop from a 28-px image padded by 4 on top/left: the first 4 rows and columns are padding.
    window = torch.tensor([[-4 / 28, -4 / 28, 28 / 28, 28 / 28]])
    sal = warp_to_crop(maps, window, torch.zeros(1, dtype=torch.bool), (32, 32))[0]
    assert sal[:4].abs().max() == 0 and sal[:, :4].abs().max() == 0
    assert torch.equal(sal[4:, 4:], torch.ones(28, 28))
