"""Evaluation metrics of members and their ensemble, from stacked logits, and temperature scaling.

Keys carry no split: the trainer prefixes them with the split they were computed on (`val/`, `test/`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def prefixed(split: str, metrics: dict) -> dict:
    """Metric keys under the split they were computed on: `val/ensemble/acc`, `test/member/0/nll`."""
    return {f"{split}/{key}": value for key, value in metrics.items()}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of probabilities (N, classes): `bins` equal-width confidence bins, L1 (torchmetrics' definition)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs, labels, probs.shape[-1], n_bins=bins, norm="l1"))


def ensemble_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log of the mean softmax of logits (K, N, classes): the ensemble's prediction, as logits (N, classes)."""
    return logits.float().softmax(-1).mean(0).clamp_min(1e-12).log()


def ensemble_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """logits (K, N, classes) of K members on the same N samples, labels (N,) -> a flat metrics dict.

    Per member: accuracy and NLL. Ensemble (mean of softmax): accuracy, NLL, ECE (`bins` equal-width bins) and
    mean pairwise disagreement (fraction of samples where two members' argmax differ).
    """
    K = logits.shape[0]
    logits, labels = logits.float(), labels.long()
    out: dict[str, float] = {}
    for m in range(K):
        out[f"member/{m}/acc"] = float((logits[m].argmax(-1) == labels).float().mean())
        out[f"member/{m}/nll"] = float(F.cross_entropy(logits[m], labels))
    log_probs = ensemble_log_probs(logits)  # (N, classes)
    out["ensemble/acc"] = float((log_probs.argmax(-1) == labels).float().mean())
    out["ensemble/nll"] = float(F.nll_loss(log_probs, labels))
    out["ensemble/ece"] = expected_calibration_error(log_probs.exp(), labels, bins)
    predictions = logits.argmax(-1)  # (K, N)
    pairs = list(itertools.combinations(range(K), 2))
    out["ensemble/disagreement"] = (
        sum(float((predictions[a] != predictions[b]).float().mean()) for a, b in pairs) / len(pairs) if pairs else 0.0
    )
    member_acc = [out[f"member/{m}/acc"] for m in range(K)]
    out["ensemble/gain_over_mean_member"] = out["ensemble/acc"] - sum(member_acc) / K
    return out


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on (logits (N, classes), labels): LBFGS on log T in
    float64. T = 1 if the optimiser ends anywhere worse than T = 1, so scaling never raises the fitted NLL."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    with torch.no_grad():
        fitted = float(F.cross_entropy(logits / temperature, labels))
        plain = float(F.cross_entropy(logits, labels))
    return temperature if fitted <= plain and temperature > 0 else 1.0


def temperature_scaled(temperature: float, logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """NLL and ECE of the ensemble (logits (K, N, classes)) after dividing its log mean softmax by `temperature`."""
    scaled = ensemble_log_probs(logits) / temperature  # (N, classes), renormalised by the softmax below
    labels = labels.long()
    return {
        "ensemble/nll_ts": float(F.cross_entropy(scaled, labels)),
        "ensemble/ece_ts": expected_calibration_error(scaled.softmax(-1), labels, bins),
        "ensemble/temperature": temperature,
    }
