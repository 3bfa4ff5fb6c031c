"""Evaluation on a held-out split: every member's logits, and accuracy under occlusion.

Each rank scores its own members on its member group's shard; rows of (member, sample, values...) from every
rank are all-gathered, so ensemble metrics see every member on the same samples, in any process layout.

Occlusion robustness, at the end of a run: a model that relies on one cue loses it when that cue is erased.
- `random`: Cutout's square (side 0.5 of the image), at the same place for every member, run and configuration;
- `salient`: the top `area` fraction of pixels by the model's own true-class Grad-CAM;
- `salient_box`: a square of the same nominal area centred on that map's peak (clipped at the border).
The ensemble is occluded by the mean of its members' maps. Every fill is 0 after normalisation (the dataset
mean), painted by the cut code the training stage uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gutout import GradCAM, normalise_maps
from gutout.cut import apply_plan_torch, cut
from gutout.pipelines import LoaderConfig, make_source
from gutout.plan import MODE_BOX, CutPlan, random_boxes

from .metrics import ensemble_log_probs, ensemble_metrics, fit_temperature, prefixed, temperature_scaled

OCCLUSIONS = ("random", "salient", "salient_box")


@dataclass(frozen=True)
class OcclusionConfig:
    area: float = 0.2  # salient occlusion: the top 20 % of pixels by Grad-CAM
    side: float = 0.5  # random occlusion: Cutout's square, as a fraction of the image side
    seed: int = 0  # the random squares: fixed, so every member, run and configuration sees the same ones


class Evaluator:
    """Scores this rank's members (`nets`: {member index: network}) on any dataset's "val" view."""

    def __init__(
        self,
        nets: dict[int, nn.Module],
        members: int,
        num_classes: int,
        config: LoaderConfig,
        gather: Callable[[torch.Tensor], torch.Tensor],
        autocast: Callable[[], AbstractContextManager],
        layer: str,
        channels_last: bool = False,
    ):
        self.nets, self.members, self.num_classes, self.config = nets, members, num_classes, config
        self.gather, self.autocast, self.layer, self.channels_last = gather, autocast, layer, channels_last
        self.device = torch.device(config.device)

    def _batches(self, dataset):
        for batch in make_source(dataset, "val", self.config):
            images = batch.images.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.images
            yield batch._replace(images=images)

    def _stack(self, rows: list[torch.Tensor], samples: int, width: int) -> torch.Tensor:
        """Rows (member, sample, values...) of every rank -> (K, N, width) on the CPU."""
        local = torch.cat(rows) if rows else torch.zeros(0, 2 + width, device=self.device)  # an empty shard
        gathered = self.gather(local).cpu()
        stacked = torch.zeros(self.members, samples, width)
        stacked[gathered[:, 0].long(), gathered[:, 1].long()] = gathered[:, 2:].float()
        return stacked

    @staticmethod
    def _row(member: int, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ids = torch.stack([torch.full_like(indices, member), indices], 1).to(values.device, torch.float32)
        return torch.cat([ids, values.float().flatten(1)], 1)

    @torch.no_grad()
    def logits(self, dataset) -> torch.Tensor:
        """(K, N, classes) float32 logits of every member on every sample of `dataset`."""
        for net in self.nets.values():
            net.eval()
        rows = []
        for batch in self._batches(dataset):
            with self.autocast():
                for m, net in self.nets.items():
                    rows.append(self._row(m, batch.indices, net(batch.images)))
        return self._stack(rows, len(dataset), self.num_classes)

    def scores(self, split: str, dataset) -> tuple[dict, torch.Tensor]:
        """Every member on all of `dataset`: (metrics keyed `<split>/...`, logits (K, N, classes))."""
        logits = self.logits(dataset)
        return prefixed(split, ensemble_metrics(logits, dataset.labels)), logits

    def final(self, splits: dict, eval_split: str, eval_logits: torch.Tensor) -> dict:
        """At the end of a run, given `splits` {"val": dataset or None, "test": dataset} and the logits of the split
        every epoch was scored on: the test set, read once here when a validation split exists; NLL and ECE after
        one temperature fitted on the validation split; occlusion robustness on every evaluated split."""
        record, logits = {}, {eval_split: eval_logits}
        if splits["val"] is not None:
            metrics, logits["test"] = self.scores("test", splits["test"])
            record.update(metrics)
            temperature = fit_temperature(ensemble_log_probs(logits["val"]), splits["val"].labels)
            for split, split_logits in logits.items():
                record.update(prefixed(split, temperature_scaled(temperature, split_logits, splits[split].labels)))
        for split in logits:
            maps = self._maps(splits[split])  # (K, N, h, w): each member's true-class Grad-CAM
            record.update(prefixed(split, self.occlusion(splits[split], maps=maps)))
            if self.members > 1:
                record[f"{split}/ensemble/cam_similarity"] = cam_similarity(maps)
        return record

    def occlusion(
        self, dataset, settings: OcclusionConfig = OcclusionConfig(), maps: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Accuracy of each member and of the ensemble under each occlusion (keys `member/<m>/occlusion/<name>_acc`
        and `ensemble/occlusion/<name>_acc`); `maps`: the members' true-class Grad-CAM of `dataset` (K, N, h, w),
        when already made."""
        for net in self.nets.values():
            net.eval()
        labels = dataset.labels.long()
        N = len(dataset)
        maps = self._maps(dataset) if maps is None else maps  # (K, N, h, w)
        ensemble_maps = normalise_maps(maps.mean(0))  # (N, h, w)
        names = (*OCCLUSIONS, "ensemble_salient", "ensemble_box") if self.members > 1 else OCCLUSIONS
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        boxes = None
        for batch in self._batches(dataset):
            if boxes is None:  # one square per sample of the dataset, whichever shard and batch it comes in
                draws = torch.Generator().manual_seed(settings.seed)
                boxes = random_boxes(N, tuple(batch.images.shape[-2:]), settings.side, draws)  # (N, 4)
            idx = batch.indices.cpu()
            random_view = occlude_boxes(batch.images, boxes[idx])
            for m, net in self.nets.items():
                views = {"random": random_view, **salient_views(batch.images, maps[m, idx], settings.area)}
                if self.members > 1:  # one member: its own map is the ensemble's
                    ensemble = salient_views(batch.images, ensemble_maps[idx], settings.area)
                    views |= {"ensemble_salient": ensemble["salient"], "ensemble_box": ensemble["salient_box"]}
                with torch.no_grad(), self.autocast():
                    for name, view in views.items():
                        rows[name].append(self._row(m, batch.indices, net(view)))
        logits = {name: self._stack(r, N, self.num_classes) for name, r in rows.items()}  # each (K, N, classes)
        if self.members == 1:
            logits["ensemble_salient"], logits["ensemble_box"] = logits["salient"], logits["salient_box"]
        out = {}
        for name in OCCLUSIONS:
            for m in range(self.members):
                out[f"member/{m}/occlusion/{name}_acc"] = accuracy(logits[name][m], labels)
        out["ensemble/occlusion/random_acc"] = ensemble_accuracy(logits["random"], labels)
        out["ensemble/occlusion/salient_acc"] = ensemble_accuracy(logits["ensemble_salient"], labels)
        out["ensemble/occlusion/salient_box_acc"] = ensemble_accuracy(logits["ensemble_box"], labels)
        return out

    def _maps(self, dataset) -> torch.Tensor:
        """(K, N, h, w) true-class Grad-CAM of every member, in the frame of the evaluated images."""
        rows, shape = [], None
        for batch in self._batches(dataset):
            with self.autocast():
                for m, net in self.nets.items():
                    maps = GradCAM(net, self.layer)(batch.images, batch.labels)  # (B, h, w)
                    shape = tuple(maps.shape[-2:])
                    rows.append(self._row(m, batch.indices, maps))
        h, w = self._agree(shape)
        return self._stack(rows, len(dataset), h * w).view(self.members, len(dataset), h, w)

    def _agree(self, shape: tuple[int, int] | None) -> tuple[int, int]:
        """The map grid, known on every rank (a rank with an empty shard has seen none)."""
        local = torch.tensor([[-1, -1] if shape is None else list(shape)], dtype=torch.float32, device=self.device)
        known = self.gather(local).cpu()
        known = known[known[:, 0] >= 0]
        return int(known[0, 0]), int(known[0, 1])


def occlude_boxes(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """A copy of `images` (B, C, H, W) with each sample's box (B, 4) (r0, c0, r1, c1) filled with 0."""
    B = images.shape[0]
    plan = CutPlan(
        mode=torch.full((B,), MODE_BOX, dtype=torch.int32, device=images.device),
        tau=torch.zeros(B, device=images.device),
        box=boxes.to(images.device, torch.int32),
        noise_seed=0,
    )
    out, _ = apply_plan_torch(images.clone(), plan, None, None, None, 0.0)
    return out


def salient_views(images: torch.Tensor, maps: torch.Tensor, area: float) -> dict[str, torch.Tensor]:
    """`salient` (the top `area` of pixels by `maps` (B, h, w), which cover each image whole) and `salient_box`
    (a square of side sqrt(area) on the map's peak) occlusions of `images`, filled with 0."""
    B = images.shape[0]
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=images.device).expand(B, 4)
    flips = torch.zeros(B, dtype=torch.bool, device=images.device)
    maps = maps.to(images.device)
    # p = 1 draws nothing that matters, but from a generator of its own: evaluation leaves the global RNG alone.
    common = dict(p=1.0, fill=0.0, cold_start="none", generator=torch.Generator().manual_seed(0))
    salient, _ = cut(images, maps, full, flips, policy="area", area=area, **common)
    box, _ = cut(images, maps, full, flips, policy="box", size=math.sqrt(area), **common)
    return {"salient": salient, "salient_box": box}


def cam_similarity(maps: torch.Tensor) -> float:
    """How alike the members' evidence is: the cosine similarity of two members' true-class maps of the same sample,
    averaged over samples and over every pair of members, from (K, N, h, w) maps, K >= 2 (1: the same maps up to
    scale; 0: no cell in common; a zero map counts as 0)."""
    flat = maps.float().flatten(2)  # (K, N, h * w)
    pairs = [(a, b) for a in range(len(flat)) for b in range(a + 1, len(flat))]
    return float(torch.stack([F.cosine_similarity(flat[a], flat[b], dim=1, eps=1e-8).mean() for a, b in pairs]).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def ensemble_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the mean softmax of logits (K, N, classes)."""
    return accuracy(logits.float().softmax(-1).mean(0), labels)
