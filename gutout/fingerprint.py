"""Dataset fingerprints: identify an ordered list of samples and labels, so a cache can't be misapplied."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch


def dataset_fingerprint(sample_ids: Sequence[str] | torch.Tensor, labels: Iterable[int] | torch.Tensor) -> str:
    """`"n=<count>:<sha256 prefix>"` over the ordered sample identifiers and labels.

    `sample_ids` are file paths relative to the dataset root (folder datasets) or, for in-memory arrays,
    the uint8 image tensor itself (its bytes are hashed). Order matters: the cache is indexed by position.
    """
    h = hashlib.sha256()
    if isinstance(sample_ids, torch.Tensor):
        count = int(sample_ids.shape[0])
        h.update(repr(tuple(sample_ids.shape)).encode())
        h.update(sample_ids.detach().cpu().contiguous().numpy().tobytes())
    else:
        count = len(sample_ids)
        for name in sample_ids:
            h.update(str(name).encode())
            h.update(b"\0")
    label_tensor = torch.as_tensor(labels if isinstance(labels, torch.Tensor) else list(labels))
    if int(label_tensor.numel()) != count:
        raise ValueError(f"dataset_fingerprint: {count} samples but {int(label_tensor.numel())} labels")
    h.update(label_tensor.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return f"n={count}:{h.hexdigest()[:24]}"
