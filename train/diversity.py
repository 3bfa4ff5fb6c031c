"""A loss-space rival to peer-Gutout (SDDE, Dereka et al. 2023): penalise the similarity of the members' saliency.

For member m's step on its batch x: its true-class CAM from its own forward (the closed form of Grad-CAM for a GAP
and linear head, kept differentiable in the activations and the head's weights), the CAMs of its peers on the same
x (their forwards in eval mode, without gradients: constants), and the penalty λ × the mean over peers and samples
of the cosine similarity between m's map and each peer's. The gradient reaches member m only.
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
def peer_cams(peers: list[nn.Module], layer: str, images: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """Each peer's true-class CAM on `images` (eval mode, no gradients; modes restored)."""
    maps = []
    for net in peers:
        with preserved_modes(net), ActivationCapture(net, layer) as capture:
            net.eval()
            net(images)
        maps.append(class_cams(capture.activations, net.fc.weight, targets))
    return maps
