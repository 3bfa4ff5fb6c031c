"""Multi-process training over torch.distributed (NCCL on GPU, gloo on CPU), launched by torchrun.

Placement of K members on W ranks:
- W = K: one member per rank;
- W = g K: each member gets a DDP group of g ranks (its data sharded over them);
- W < K: rank r holds members r, r + W, r + 2W, ... (several members on one rank);
- anything else is an error that says which layouts work.

Every rank holds the whole SaliencyCache. Each rank refreshes the maps of its own members on its own shard;
before `publish()`, the entries each rank wrote are all-gathered, so every rank publishes the complete cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gutout import SaliencyCache
from gutout.config import ConfigError


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    members: tuple[int, ...]  # the members this rank trains
    group_size: int  # ranks per member (> 1: the member's model is DDP over its group)
    shard_id: int  # this rank's shard of its member's data, in [0, group_size)

    @property
    def group_leader(self) -> bool:
        """The first rank of its member group: writes that member's checkpoint."""
        return self.shard_id == 0

    def group_ranks(self, member: int) -> list[int]:
        return list(range(member * self.group_size, (member + 1) * self.group_size))


def plan_layout(members: int, world: int, rank: int) -> Layout:
    if world <= members:
        return Layout(world, rank, tuple(range(rank, members, world)), 1, 0)
    if world % members == 0:
        group = world // members
        return Layout(world, rank, (rank // group,), group, rank % group)
    raise ConfigError(
        f"cannot place {members} ensemble members on {world} processes: use at most {members} processes "
        f"(several members per process) or a multiple of {members} (a DDP group per member)"
    )


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The device of this process: its local GPU (one per rank) or the CPU; `device` is "auto", "cpu" or "cuda"."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available here; use --device cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Runtime:
    """The process group (or a single process), and the collectives the trainer needs."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.groups: dict[int, dist.ProcessGroup] = {}

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        if not self.distributed or dist.is_initialized():
            return
        # The launcher's store outlives a restart; keys under a per-attempt prefix keep the restarted workers
        # from reading the addresses their dead predecessors published (gloo then fails to connect).
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"gutout/attempt-{attempt}", store),
            rank=rank,
            world_size=world,
        )

    def member_groups(self, layout: Layout, members: int) -> None:
        """A DDP group per member when members span several ranks (every rank creates every group)."""
        if layout.group_size > 1:
            for m in range(members):
                self.groups[m] = dist.new_group(layout.group_ranks(m))

    def broadcast_buffers(self, module: torch.nn.Module, member: int, layout: Layout) -> None:
        """Give every rank of `member`'s DDP group the group leader's buffers (BatchNorm's running statistics).
        DDP broadcasts them at the start of each forward, but each rank then updates them with its own batch: after
        an epoch the copies differ, and evaluating or refreshing on several ranks would score several models."""
        if layout.group_size < 2:
            return
        leader = layout.group_ranks(member)[0]
        for buffer in module.buffers():
            dist.broadcast(buffer, src=leader, group=self.groups[member])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_min(self, value: int, device: torch.device) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather_objects(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order."""
        if not self.distributed:
            return [value]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def all_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `rows` (n_r, ...) along dim 0 (ranks may hold different n_r)."""
        if not self.distributed:
            return rows
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        longest = int(max(c.item() for c in counts))
        padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        padded[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])

    def sync_cache(self, cache: SaliencyCache) -> int:
        """All-gather the entries each rank wrote since the last gather or publish; returns the bytes received."""
        if not self.distributed:
            return 0
        members, indices, maps, usable = cache.dirty_entries()
        h, w = cache.map_size
        # One row per entry: (member, index, usable); indices overflow float16 and int16, so ship them as int64.
        rows = torch.stack([members, indices, usable.long()], dim=1).to(torch.int64)
        ids = self.all_gather_rows(rows)  # (n, 3)
        gathered = self.all_gather_rows(maps.reshape(-1, h * w))  # (n, h * w) float16
        cache.write_entries(ids[:, 0], ids[:, 1], gathered.view(-1, h, w), usable=ids[:, 2].bool())
        return int(gathered.numel() * gathered.element_size() + ids.numel() * ids.element_size())

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
