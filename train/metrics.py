"""Evaluation metrics of members and their ensemble, from stacked logits."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def ensemble_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """logits (K, N, classes) of K members on the same N samples, labels (N,) -> a flat metrics dict.

    Per member: accuracy and NLL. Ensemble (mean of softmax): accuracy, NLL, ECE (torchmetrics, `bins`
    equal-width bins) and mean pairwise disagreement (fraction of samples where two members' argmax differ).
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    K, N, classes = logits.shape
    logits, labels = logits.float(), labels.long()
    probs = logits.softmax(-1)  # (K, N, classes)
    out: dict[str, float] = {}
    for m in range(K):
        out[f"member/{m}/val_acc"] = float((logits[m].argmax(-1) == labels).float().mean())
        out[f"member/{m}/val_nll"] = float(F.cross_entropy(logits[m], labels))
    mean_probs = probs.mean(0)  # (N, classes)
    out["ensemble/val_acc"] = float((mean_probs.argmax(-1) == labels).float().mean())
    out["ensemble/nll"] = float(F.nll_loss(mean_probs.clamp_min(1e-12).log(), labels))
    out["ensemble/ece"] = float(multiclass_calibration_error(mean_probs, labels, classes, n_bins=bins, norm="l1"))
    predictions = logits.argmax(-1)  # (K, N)
    pairs = list(itertools.combinations(range(K), 2))
    out["ensemble/disagreement"] = (
        sum(float((predictions[a] != predictions[b]).float().mean()) for a, b in pairs) / len(pairs) if pairs else 0.0
    )
    member_acc = [out[f"member/{m}/val_acc"] for m in range(K)]
    out["ensemble/gain_over_mean_member"] = out["ensemble/val_acc"] - sum(member_acc) / K
    return out
