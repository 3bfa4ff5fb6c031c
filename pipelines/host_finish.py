"""Finishing DALI's CPU train crops on the host: resize with torch, flip, then normalise (and cut) in one pass.

Why: without a GPU, DALI's antialiased resize costs more than decoding the crop, and several times torch's uint8
antialiased bilinear resize (the triangle filter of PIL and torchvision); `python bench/loader.py --breakdown`
measures each operator. So on a CPU the train graph stops after decoding the crop, and each batch is finished
here: per sample a resize to S x S and the flip (crops differ in size, so this is a loop over the batch), then one
pass that normalises into float32 and, when the loader passes its stage, cuts while each sample is still in cache.
`LoaderConfig.cpu_resize="dali"` keeps DALI's own resize and normalisation instead.

The window contract is unchanged: the crop is exactly the window DALI drew, resized with pixel centres
mapped linearly (align_corners=False), then flipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from gutout.normalise import normalise_uint8


class OutputPool:
    """Float32 batches reused once nothing outside the pool refers to them.

    A fresh batch per step costs a page fault per page (for 64 x 3 x 224 x 224 float32, ~9400 of them: more than
    the normalise pass it holds); DALI avoids this with its own pool. A buffer is reused only when its storage's
    use count says that no tensor in this process but the pool's own holds it, and never once its storage
    has been moved to shared memory (sent to another process, which the count cannot see). So a batch the
    caller keeps, or a view of it, is never overwritten; code that keeps raw pointers to the memory is on its
    own. Where the count cannot be read (it is torch-internal) every batch is fresh. One consumer at a time:
    a source is iterated by one thread, as DALI pipelines are.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = max(1, capacity)  # buffers kept per shape (an epoch's last, partial batch has its own)
        self.buffers: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.enabled = _use_count_works()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 tensor of `shape`, always a fresh alias (its own TensorImpl) of a pooled buffer: the count
        reads storage references, and the pool's own tensor object, if handed out, would hide the caller's."""
        if not self.enabled:
            return torch.empty(shape, dtype=torch.float32)
        kept = self.buffers.setdefault(shape, [])
        kept[:] = [b for b in kept if not b.untyped_storage().is_shared()]  # another process may read those
        for buffer in kept:
            if _storage_users(buffer) == 1:
                return buffer.view(shape)
        buffer = torch.empty(shape, dtype=torch.float32)
        kept.append(buffer)
        del kept[: max(len(kept) - self.capacity, 0)]  # held ones past the capacity stay the caller's
        return buffer.view(shape)


def _storage_users(tensor: torch.Tensor) -> int:
    """Tensors sharing `tensor`'s storage (itself included): the count less the probe's own reference."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) - 1


def _use_count_works() -> bool:
    """Check the internal count behaves as `take` assumes: 1 for a lone tensor, +1 per view."""
    try:
        lone = torch.empty(4)
        alone = _storage_users(lone)
        view = lone[1:]
        shared = _storage_users(lone)
        del view
        return (alone, shared, _storage_users(lone)) == (1, 2, 1)
    except (AttributeError, RuntimeError, TypeError):
        return False


class HostFinish:
    """Resizes a batch of DALI's decoded crops to (n, C, S, S) and normalises it into float32."""

    def __init__(self, image_size: int, mean: list[float], std: list[float], batch_size: int):
        self.size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32) * 255  # (C,) in uint8 pixel units
        self.std = torch.tensor(std, dtype=torch.float32) * 255
        # Reused from batch to batch: it never leaves this object (the float output is what callers get).
        self.resized = torch.empty(batch_size, len(mean), image_size, image_size, dtype=torch.uint8)
        self.pool = OutputPool()

    def resize(self, crops: list, flips: torch.Tensor) -> torch.Tensor:
        """DALI crops (HWC uint8 tensors of any size, DLPack) -> (n, C, S, S) uint8, flipped where `flips` says."""
        n = len(crops)
        out = self.resized[:n]
        for i in range(n):
            crop = torch.from_dlpack(crops[i]).permute(2, 0, 1)[None]  # (1, C, h, w), channels-last memory
            # uint8 in, uint8 out: torch's vectorised antialiased path (channels-last, as DALI's HWC is).
            resized = F.interpolate(
                crop, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )[0]
            out[i].copy_(resized.flip(-1) if flips[i] else resized)  # the flip is applied after the crop
        return out

    def output(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 batch to finish into (pooled: see OutputPool)."""
        return self.pool.take(shape)

    def normalise(self, resized: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return normalise_uint8(resized, out, self.mean, self.std)


def host_thread_limit(host_threads: int | None, dali_threads: int) -> int | None:
    """The torch threads of the host pass (LoaderConfig.host_threads): None for torch's own setting."""
    if host_threads == 0:
        return None
    if host_threads is not None:
        return host_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - dali_threads)


@contextmanager
def torch_threads(limit: int | None) -> Iterator[None]:
    """At most `limit` torch intra-op threads in this block (None: no limit), the setting restored after. The
    setting is the calling thread's (OpenMP's), and the host pass runs in the thread that iterates the loader."""
    before = torch.get_num_threads()
    if limit is None or limit >= before:
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(before)
