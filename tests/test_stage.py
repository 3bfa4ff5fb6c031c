import pytest
import torch

from gutout import CutConfig, GutoutStage, SaliencyCache, StageConfig
from gutout.config import ConfigError


def make_cache(K=2, N=16):
    cache = SaliencyCache(K, N, (4, 4))
    for k in range(K):
        maps = torch.zeros(N, 4, 4)
        maps[:, :, 2 * k : 2 * k + 2] = 1.0  # member 0 looks at the left half, member 1 at the right half
        cache.update(k, torch.arange(N), maps)
    cache.publish()
    return cache


def full_windows(B):
    return torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(B, 4), torch.zeros(B, dtype=torch.bool)


def test_peers_others_cuts_with_the_other_members_saliency():
    cache = make_cache()
    windows, flips = full_windows(8)
    stage = GutoutStage(StageConfig(CutConfig(policy="threshold", threshold=0.5), peers="others"), cache, member=0)
    out = stage(torch.ones(8, 3, 8, 8), torch.arange(8), windows, flips)
    assert bool((out[:, :, :, 4:] == 0).all()) and bool((out[:, :, :, :4] == 1).all())  # member 1's half
    own = GutoutStage(StageConfig(CutConfig(threshold=0.5), peers="self"), cache, member=0)
    out = own(torch.ones(8, 3, 8, 8), torch.arange(8), windows, flips)
    assert bool((out[:, :, :, :4] == 0).all()) and bool((out[:, :, :, 4:] == 1).all())
    both = GutoutStage(StageConfig(CutConfig(threshold=0.5), peers="max"), cache, member=0)
    out = both(torch.ones(8, 3, 8, 8), torch.arange(8), windows, flips)
    assert bool((out == 0).all())
    assert abs(both.stats.mean - 1.0) < 1e-6 and own.stats.mean == 0.5 and own.stats.std == 0.0


def test_statistics_accumulate_and_reset():
    cache = make_cache()
    windows, flips = full_windows(4)
    stage = GutoutStage(StageConfig(CutConfig(policy="cutout", size=0.5)), cache)
    stage(torch.ones(4, 1, 8, 8), torch.arange(4), windows, flips, torch.Generator().manual_seed(0))
    assert stage.stats.samples == 4 and 0 < stage.stats.mean <= 0.25 and stage.stats.last.shape == (4,)
    stage.stats.reset()
    assert stage.stats.samples == 0 and stage.stats.mean == 0.0


def test_flat_config_and_bad_configs():
    cfg = StageConfig.from_flat({"policy": "area", "area": 0.2, "peers": "self"})
    assert cfg.peers == "self" and cfg.cut.policy == "area" and cfg.cut.area == 0.2
    with pytest.raises(ConfigError, match="unknown CutConfig key.*colour"):
        StageConfig.from_flat({"colour": 1})
    with pytest.raises(ConfigError, match="peers='neighbours'"):
        StageConfig(peers="neighbours")
    with pytest.raises(ConfigError, match="at least 2 members"):
        GutoutStage(StageConfig(peers="others"), SaliencyCache(1, 4, (4, 4)))
    with pytest.raises(ValueError, match="needs a SaliencyCache"):
        GutoutStage(StageConfig())
    GutoutStage(StageConfig(CutConfig(policy="cutout")))  # baselines need no cache
