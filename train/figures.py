"""Figures of a run: the sample grid (image, each member's saliency, each member's Gutout view) and curves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from gutout import GutoutStage, SaliencyCache, StageConfig
from gutout.pipelines import LoaderConfig, make_source


def jet(maps: torch.Tensor) -> torch.Tensor:
    """A jet-like colour map: (..., H, W) in [0, 1] -> (..., 3, H, W) in [0, 1]."""
    m = maps.clamp(0, 1)[..., None, :, :]
    return torch.cat([(1.5 - (4 * m - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)], dim=-3)


def to_display(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (B, C, H, W) -> RGB in [0, 1]."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    rgb = (images.float() * std + mean).clamp(0, 1)
    return rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb


def sample_grid(images, maps, cut_views, mean, std, scale: int = 4) -> torch.Tensor:
    """uint8 (H, W, 3) grid; rows are samples, columns: image | saliency of each member | Gutout view of each.

    images (n, C, H, W) and cut_views (K, n, C, H, W) normalised, maps (K, n, h, w) canonical (whole image).
    """
    n, _, H, W = images.shape
    base = to_display(images, mean, std)  # (n, 3, H, W)
    columns = [base]
    for member_maps in maps:
        heat = jet(F.interpolate(member_maps[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0])
        columns.append(0.5 * base + 0.5 * heat)
    columns += [to_display(view, mean, std) for view in cut_views]
    tiles = torch.stack(columns, dim=1)  # (n, columns, 3, H, W)
    tiles = F.pad(tiles, (1, 1, 1, 1), value=1.0)  # white separators
    cols = tiles.shape[1]
    grid = tiles.permute(0, 3, 1, 4, 2).reshape(n * (H + 2), cols * (W + 2), 3)  # (rows, cols, 3)
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (grid * 255).round().to(torch.uint8).cpu()


def save_png(grid: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(grid.numpy()).save(path)


def save_curves(history: list[dict], members: int, path: Path, steps: list[dict] = ()) -> None:
    """Accuracy of each member and of the ensemble, and disagreement, against the epoch; with step records, each
    member's training loss and the images/s against the (fractional) epoch too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    split = "val" if any("val/ensemble/acc" in r for r in history) else "test"  # what the epochs were scored on
    records = [r for r in history if f"{split}/ensemble/acc" in r]
    epochs = [r["epoch"] for r in records]
    panels = 3 if steps else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    acc_ax, dis_ax = axes[:2]
    for m in range(members):
        acc_ax.plot(epochs, [100 * r[f"{split}/member/{m}/acc"] for r in records], "--", label=f"member {m}")
    acc_ax.plot(epochs, [100 * r[f"{split}/ensemble/acc"] for r in records], "k-", lw=2, label="ensemble")
    acc_ax.set(xlabel="epoch", ylabel=f"{'validation' if split == 'val' else 'test'} accuracy (%)", title="accuracy")
    acc_ax.legend(fontsize=8)
    dis_ax.plot(epochs, [100 * r[f"{split}/ensemble/disagreement"] for r in records], "C3-", label="disagreement")
    dis_ax.plot(epochs, [100 * r["gutout/erased_frac"] for r in records], "C2:", label="erased fraction")
    dis_ax.set(xlabel="epoch", ylabel="%", title="pairwise disagreement / erased area")
    dis_ax.legend(fontsize=8)
    if steps:
        step_ax, rate_ax = axes[2], axes[2].twinx()
        for m in range(members):
            key = f"step/loss/member/{m}"
            shown = [r for r in steps if key in r]
            step_ax.plot([r["step/epoch"] for r in shown], [r[key] for r in shown], lw=1, label=f"member {m}")
        rate_ax.plot([r["step/epoch"] for r in steps], [r["step/img_per_s"] for r in steps], "k:", lw=1)
        step_ax.set(xlabel="epoch", ylabel="training loss (members)", title="per step: loss, images/s (dotted)")
        rate_ax.set_ylabel("images/s")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_images(
    dataset, config: LoaderConfig, cache: SaliencyCache, stage: StageConfig, n: int
) -> torch.Tensor | None:
    """The sample grid of the first `n` samples: image, each member's saliency, each member's Gutout view (uint8
    (H, W, 3)); every sample is cut (p = 1), since the grid is for looking at what Gutout erases."""
    n = min(n, len(dataset))
    if n == 0:
        return None
    config = dataclasses.replace(config, batch_size=n, shard_id=0, num_shards=1)
    batch = next(iter(make_source(dataset, "refresh", config)))
    maps = cache.maps[:, batch.indices.to(cache.device)]  # (K, n, h, w)
    shown = dataclasses.replace(stage, cut=dataclasses.replace(stage.cut, p=1.0))
    generator = torch.Generator().manual_seed(0)
    views = [
        GutoutStage(shown, cache, m)(batch.images.clone(), batch.indices, batch.windows, batch.flips, generator)
        for m in range(cache.members)
    ]
    return sample_grid(batch.images, maps, torch.stack(views), config.mean, config.std)


def write_figures(
    run_dir: Path, history: list[dict], members: int, grid: torch.Tensor | None, steps: list[dict] | None = None
) -> list[Path]:
    """samples.png (when there is a grid) and curves.png (when there is a history) in `run_dir`."""
    paths = []
    if grid is not None:
        save_png(grid, run_dir / "samples.png")
        paths.append(run_dir / "samples.png")
    save_curves(history, members, run_dir / "curves.png", steps or [])
    if (run_dir / "curves.png").exists():
        paths.append(run_dir / "curves.png")
    return paths


def redraw(run_dir: Path, saved) -> list[Path]:
    """The figures of a run directory from its files alone — config.yaml, metrics.jsonl, the maps (cache.gsc, or
    the last checkpoint's while the run goes on) and the dataset; no model is built."""
    from .data import load_splits, loader_config
    from .rundir import CHECKPOINT, ResumeMismatch
    from .tracking import read_metrics

    cfg = dataclasses.replace(saved, out=str(run_dir.parent), name=run_dir.name)
    train = load_splits(cfg).train
    if (run_dir / "cache.gsc").exists():
        cache = SaliencyCache.load(run_dir / "cache.gsc")
    elif (run_dir / CHECKPOINT).exists():
        state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["cache"]
        header = state["header"]
        cache = SaliencyCache(
            header["members"],
            header["samples"],
            tuple(header["map_size"]),
            fingerprint=header["fingerprint"],
            layer=header["layer"],
            target=header["target"],
        )
        cache.load_state_dict(state)
    else:
        raise ResumeMismatch("it has no checkpoint yet")
    if cache.fingerprint != train.fingerprint:
        raise ResumeMismatch(
            f"its maps belong to other samples (fingerprint {cache.fingerprint}, the dataset now {train.fingerprint})"
        )
    history, steps = read_metrics(run_dir)
    stage = StageConfig(cfg.cut_config(), peers=cfg.peer_rule)
    grid = sample_images(train, loader_config(cfg, train), cache, stage, cfg.sample_grid)
    return write_figures(run_dir, history, cfg.ensemble, grid, steps)
