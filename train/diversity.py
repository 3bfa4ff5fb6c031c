"""A loss-space rival to peer-Gutout (SDDE, Dereka et al. 2023): penalise the similarity of the members' saliency.

For member m's step on its batch x: its true-class CAM from its own forward (the closed form of Grad-CAM for a GAP
and linear head, kept differentiable in the activations and the head's weights), the CAMs of its peers on the same
x (their forwards in eval mode, without gradients: constants), and the penalty λ × the mean over peers and samples
of the cosine similarity between m's map and each peer's. The gradient reaches member m only.

The peers' maps of a step are all made before any member takes it (from the weights every member had after the
previous step), so the penalty is the same whether the members share one process or are spread over several
(`exchange_peer_cams`: each process sends its members' step inputs to every other and gets their maps back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gutout import ActivationCapture
from gutout.gradcam import preserved_modes


def class_cams(activations: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """relu(sum_k w[target, k] A_k): (B, K, h, w) activations, (classes, K) weights -> (B, h * w), differentiable."""
    dtype = torch.promote_types(activations.dtype, torch.float32)  # at least float32 (AMP gives float16)
    cams = torch.einsum("bk,bkhw->bhw", weight[targets].to(dtype), activations.to(dtype))
    return F.relu(cams).flatten(1)


def similarity(own: torch.Tensor, peers: list[torch.Tensor]) -> torch.Tensor:
    """Mean cosine similarity between `own` (B, n) and each of `peers` (B, n): a scalar (0 where a map is zero)."""
    return torch.stack([F.cosine_similarity(own, peer, dim=1, eps=1e-8).mean() for peer in peers]).mean()


@torch.no_grad()
def peer_cam(net: nn.Module, layer: str, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A peer's true-class CAM on `images`, (B, h * w) (eval mode, no gradients; modes restored)."""
    with preserved_modes(net), ActivationCapture(net, layer) as capture:
        net.eval()
        net(images)
    return class_cams(capture.activations, net.fc.weight, targets)


Inputs = dict[int, tuple[torch.Tensor, torch.Tensor]]  # member -> (images, labels) of its step


def exchange_peer_cams(
    nets: dict[int, nn.Module], inputs: Inputs, shard: int, ensemble: int, layer: str, gather=None
) -> dict[int, list[torch.Tensor]]:
    """For each member of this process (`nets` and `inputs`, keyed by member), its peers' CAMs on its step inputs,
    in peer order. `gather(value)`: every process's picklable `value` in rank order; None: this process is alone.

    Each process sends its members' inputs to every other; each then makes, with each member it holds, the maps of
    every other member's inputs of its own data shard (a member trained by a DDP group has one shard per rank of the
    group, so each (inputs, peer) pair is computed exactly once), and the maps travel back the same way. Traffic:
    every step's images to every process, and (members - 1) maps per image back.
    """
    device = next(iter(inputs.values()))[0].device
    if gather is None:  # one process: nothing travels, so nothing leaves the device
        gather, wire = (lambda value: [value]), (lambda tensor: tensor)
    else:
        wire = torch.Tensor.cpu  # pickled tensors travel from host memory
    sent = {(m, shard): (wire(x), wire(y)) for m, (x, y) in inputs.items()}
    everyone = {key: value for part in gather(sent) for key, value in part.items()}
    made = {}
    for (owner, owner_shard), (images, labels) in everyone.items():
        if owner_shard != shard:
            continue
        images, labels = images.to(device), labels.to(device)
        for peer, net in nets.items():
            if peer != owner:
                made[(owner, shard, peer)] = wire(peer_cam(net, layer, images, labels))
    maps = {key: value for part in gather(made) for key, value in part.items()}  # each key made by one process
    return {m: [maps[(m, shard, p)].to(device) for p in range(ensemble) if p != m] for m in inputs}
