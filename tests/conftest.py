import pytest
import torch

torch.set_num_threads(2)  # this project's machines have 2 cores


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_windows(batch: int, generator: torch.Generator, pad: float = 0.0) -> torch.Tensor:
    """Crop windows (B, 4) inside [-pad, 1 + pad], non-degenerate, arbitrary aspect."""
    lo = torch.rand(batch, 2, generator=generator) * 0.6 - pad
    size = torch.rand(batch, 2, generator=generator) * (0.4 + pad) + 0.2
    hi = lo + size
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], dim=1)
