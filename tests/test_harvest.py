"""Harvest mode against the refresh pass: the maps harvested from training forwards are the pass's maps, in the
canonical frame, wherever the training view saw the image."""

import dataclasses

import torch
from torch import nn

from gutout import ActivationCapture, SaliencyCache, cam_from_activations, warp_to_canonical
from gutout.pipelines import ArrayDataset, GutoutLoader, LoaderConfig, make_source
from gutout.train.config import TrainConfig
from gutout.train.trainer import Trainer
from tests.conftest import fake_fashion_mnist


def harvest(trainer: Trainer, member, batch) -> None:
    """What the trainer does on a harvest step: capture the layer in the forward, then `_harvest`."""
    with ActivationCapture(member.net, trainer.layer) as capture:
        logits = member.net(batch.images)
    trainer._harvest(member, capture.activations, logits, batch)


def test_harvest_on_whole_images_equals_the_pass(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data", n_train=96, n_test=16)
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path), ensemble=2, refresh="harvest", wandb="disabled", num_threads=0, batch_size=32
    )
    trainer = Trainer(cfg, log=lambda *a: None)
    whole = dataclasses.replace(trainer.loader_config, batch_size=32)
    for member in trainer.members:
        member.net.eval()  # no cut, no crop, no flip, eval mode: the harvest sees what the pass sees
        for batch in make_source(trainer.train_set, "refresh", whole):
            assert bool((batch.windows == torch.tensor([0.0, 0.0, 1.0, 1.0])).all()) and not bool(batch.flips.any())
            with torch.no_grad():
                harvest(trainer, member, batch)
    trainer.cache.publish()
    harvested = trainer.cache.maps.float().clone()
    for member in trainer.members:
        member.loader.refresh(member.net, trainer.layer, publish=False)
    trainer.cache.publish()
    passed = trainer.cache.maps.float()
    assert bool(trainer.cache.valid.all())
    assert (harvested - passed).abs().max() < 2e-3  # float16 storage
    assert passed.flatten(2).amax(-1).gt(0).float().mean() > 0.5  # the comparison is not of empty maps


class PointwiseNet(nn.Module):
    """Each cell of `layer` depends on its own input pixel only: a crop's CAM is exactly the crop of the image's
    CAM (up to the per-map max normalisation), so harvest's warp back to the canonical frame can be checked
    exactly, flips and padding included."""

    def __init__(self, channels=1, width=8, classes=3):
        super().__init__()
        self.layer = nn.Sequential(nn.Conv2d(channels, width, 1), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.layer(x).mean(dim=(-2, -1)))


def test_harvested_crops_land_where_the_pass_puts_them():
    g = torch.Generator().manual_seed(0)
    N, H, W = 24, 12, 10
    images = (torch.rand(N, H, W, generator=g) * 255).to(torch.uint8)
    dataset = ArrayDataset(images, torch.arange(N) % 3, ("a", "b", "c"), "random")
    net = PointwiseNet().eval()
    torch.manual_seed(0)
    nn.init.normal_(net.fc.weight)
    cache = SaliencyCache(1, N, (H, W))  # maps at the images' own resolution, as the layer's
    loader = GutoutLoader(dataset, LoaderConfig(batch_size=8, pad=3, backend="tensor", num_threads=0), cache=cache)
    loader.refresh(net, "layer")  # the pass: whole images
    passed = cache.maps[0].float()  # (N, H, W)
    checked = flipped = padded = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader.batches():  # training views: pad-and-crop and flips, no cut (policy none)
            with torch.no_grad(), ActivationCapture(net, "layer") as capture:
                net(batch.images)
            cams = cam_from_activations(capture.activations, net.fc.weight, batch.labels)  # (B, H, W) crop frame
            maps, covered = warp_to_canonical(cams, batch.windows, batch.flips, (H, W))
            for b, index in enumerate(batch.indices.tolist()):
                seen = covered[b]
                harvested, reference = maps[b][seen], passed[index][seen]
                if reference.max() <= 0:
                    continue
                # The same map up to the normalisation: compare both scaled to their max on the seen cells.
                assert torch.allclose(harvested / harvested.max(), reference / reference.max(), atol=3e-3), index
                checked += 1
                flipped += bool(batch.flips[b])
                padded += bool(seen.sum() < H * W)
    assert checked > 40 and flipped > 5 and padded > 20
