"""GutoutStage: the per-batch step a loader runs: read peers' maps from the cache, cut, keep statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import PEER_RULES, SaliencyCache
from .config import ConfigError, check_choice, from_mapping
from .cut import CutConfig, check_inputs, cut, plan_cuts, resolve_kernel
from .normalise import normalise_uint8


@dataclass(frozen=True)
class StageConfig:
    cut: CutConfig = field(default_factory=CutConfig)
    peers: str = "others"  # whose maps cut member m's images: a random other member, its own, or the max

    def __post_init__(self):
        check_choice("StageConfig", "peers", self.peers, PEER_RULES)

    @classmethod
    def from_flat(cls, mapping: Mapping[str, Any] | None = None, **overrides: Any) -> StageConfig:
        """From one flat mapping of CutConfig fields plus `peers`; unknown keys fail loudly."""
        values = dict(mapping or {}) | overrides
        peers = values.pop("peers", cls.peers)
        return cls(cut=from_mapping(CutConfig, values), peers=peers)


class CutStats:
    """Erased-fraction statistics (mean and std over samples) since the last `reset()`.

    Sums stay on the images' device, so a batch costs no host sync; reading a property syncs once.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self._sum: torch.Tensor | float = 0.0
        self._sum_sq: torch.Tensor | float = 0.0
        self.last: torch.Tensor | None = None  # (B,) erased fraction of the latest batch

    def add(self, erased: torch.Tensor) -> None:
        erased = erased.detach().float()
        self.samples += erased.numel()
        self._sum = self._sum + erased.sum()
        self._sum_sq = self._sum_sq + (erased * erased).sum()
        self.last = erased

    @property
    def mean(self) -> float:
        return float(self._sum) / self.samples if self.samples else 0.0

    @property
    def std(self) -> float:
        if not self.samples:
            return 0.0
        return max(float(self._sum_sq) / self.samples - self.mean**2, 0.0) ** 0.5


class GutoutStage:
    """Cuts member `member`'s batches with the maps its peer rule selects from `cache`.

    No model runs here: the cache is data, filled by the trainer (or `GutoutLoader.refresh`).
    """

    def __init__(self, config: StageConfig, cache: SaliencyCache | None = None, member: int = 0):
        if not isinstance(config, StageConfig):
            raise ConfigError(f"GutoutStage needs a StageConfig, got {type(config).__name__}")
        if config.cut.needs_maps and cache is None:
            raise ValueError(f"policy {config.cut.policy!r} needs a SaliencyCache; pass cache=")
        if cache is not None:
            cache._check_member(member)
            if config.peers == "others" and cache.members < 2 and config.cut.needs_maps:
                raise ConfigError("peers='others' needs an ensemble of at least 2 members; use peers='self'")
        self.config, self.cache, self.member = config, cache, member
        self.stats = CutStats()

    def __call__(
        self,
        images: torch.Tensor,
        indices: torch.Tensor,
        windows: torch.Tensor,
        flips: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Cut `images` (B, C, H, W) in place and return them; statistics go to `self.stats`."""
        cfg = self.config.cut
        maps = valid = None
        if cfg.needs_maps:
            maps, valid = self.cache.lookup(self.config.peers, indices, member=self.member, generator=generator)
        images, erased = cut(images, maps, windows, flips, cfg, valid=valid, generator=generator, inplace=True)
        self.stats.add(erased)
        return images

    def normalise_and_cut(
        self,
        source: torch.Tensor,
        out: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        indices: torch.Tensor,
        windows: torch.Tensor,
        flips: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`out` = the cut of (uint8 `source` - mean) / std: the same batch (to the bit), draws and statistics
        as `normalise_uint8` and then the stage, in one pass where the fused CPU kernel runs.

        For loaders that normalise on the host (`source` (B, C, H, W) uint8, `mean`/`std` (C,) in its units):
        the cut's stores then land on samples that are still in cache instead of costing a pass of their own.
        """
        cfg = self.config.cut
        if cfg.policy == "none" or not self._fuses(out):  # the plain path, with the same arithmetic
            return self(normalise_uint8(source, out, mean, std), indices, windows, flips, generator)
        from .cpu_kernel import normalise_and_cut_numba

        windows, flips = windows.to(out.device), flips.to(out.device)
        maps = valid = None
        if cfg.needs_maps:
            maps, valid = self.cache.lookup(self.config.peers, indices, member=self.member, generator=generator)
            maps = maps.to(out.device)  # the cache may live on another device than this CPU batch
        check_inputs(out, maps, windows, flips, cfg)
        plan = plan_cuts(maps, valid, windows, flips, tuple(out.shape[-2:]), cfg, generator)
        out, erased = normalise_and_cut_numba(source, out, mean, std, plan, maps, windows, flips, cfg.fill)
        self.stats.add(erased)
        return out

    def _fuses(self, images: torch.Tensor) -> bool:
        """Whether the fused CPU kernel would cut these images (what `cut` would pick)."""
        return resolve_kernel(images, self.config.cut) == "numba"
