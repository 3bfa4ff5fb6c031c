import pytest
import torch

torch.set_num_threads(2)  # this project's machines have 2 cores


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# Plans every fused kernel (CuPy, Numba) is checked against the torch reference on.
KERNEL_CASES = [
    dict(policy="threshold", threshold=0.5),
    dict(policy="threshold", threshold=0.0),
    dict(policy="area", area=0.3),
    dict(policy="box", size=0.4),
    dict(policy="box", size=0.3, box_center="sample", gamma=2.0),
    dict(policy="cutout", size=0.5, p=0.7),
    dict(policy="threshold", threshold=0.4, fill="noise"),
    dict(policy="area", area=0.2, fill=-2.0, cold_start="none"),
    dict(policy="threshold", threshold_rule="sigma", k=0.5),
    dict(policy="threshold", threshold_rule="range", threshold_range=(0.2, 0.6)),
    dict(policy="keep", size=0.3, threshold=0.7),
]


def small_run(data, out, **overrides):
    """A TrainConfig for a quick CPU run of the trainer on `data` (fake_fashion_mnist) into `out`: 2 epochs,
    batch 32, no W&B, no loader threads, no sample grid; `overrides` win."""
    from gutout.train.config import TrainConfig

    values = dict(
        data=str(data),
        out=str(out),
        epochs=2,
        batch_size=32,
        eval_batch_size=64,
        wandb="disabled",
        num_threads=0,
        sample_grid=0,
    )
    return TrainConfig(**(values | overrides))


def random_windows(batch: int, generator: torch.Generator, pad: float = 0.0) -> torch.Tensor:
    """Crop windows (B, 4) inside [-pad, 1 + pad], non-degenerate, arbitrary aspect."""
    lo = torch.rand(batch, 2, generator=generator) * 0.6 - pad
    size = torch.rand(batch, 2, generator=generator) * (0.4 + pad) + 0.2
    hi = lo + size
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], dim=1)


def write_idx(path, array) -> None:
    """An idx file (gzip), as Fashion-MNIST ships: uint8 data, big-endian dims."""
    import gzip
    import struct

    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_fashion_mnist(folder, n_train=512, n_test=200, seed=0):
    """A learnable stand-in for Fashion-MNIST: class c is a bright blob at a class-specific place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.rand(n, 28, 28, generator=g) * 60
        for c in range(10):
            r, col = 4 + (c // 5) * 12, 2 + (c % 5) * 5
            images[labels == c, r : r + 10, col : col + 6] += 150
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images.clamp(0, 255).numpy())
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels.numpy())
    return folder
