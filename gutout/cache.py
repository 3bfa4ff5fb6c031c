"""SaliencyCache: every member's canonical-frame map for every sample, double-buffered, with snapshots.

Layout: `maps [K, N, h, w]` float16 and `valid [K, N]` bool, on the training device. Writers `update()`
a pending buffer during epoch e; `publish()` copies it into the buffer readers see, so epoch e+1 reads
exactly the maps written up to the end of epoch e and never half an epoch.

Memory per member and buffer is N * h * w * 2 bytes: ImageNet (1,281,167 samples) at 7 x 7 is
125.6 MB (+1.3 MB of flags); K = 4 members double-buffered is about 1.0 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from .atomic import atomic_writer

PEER_RULES = ("self", "others", "max")
_MAGIC = b"GUTOUTSC"


class CacheSnapshotError(ValueError):
    """A snapshot file is unreadable, corrupt, or does not belong to this run; the message says which."""


def bytes_per_member(samples: int, map_size: tuple[int, int]) -> int:
    """Bytes of one member's maps in one buffer (float16)."""
    return samples * map_size[0] * map_size[1] * 2


class SaliencyCache:
    # 2: the digest covers the header too (1 hashed the payload only; still readable).
    FORMAT_VERSION = 2
    READABLE_VERSIONS = (1, 2)

    def __init__(
        self,
        members: int,
        samples: int,
        map_size: tuple[int, int] = (7, 7),
        *,
        device: torch.device | str = "cpu",
        fingerprint: str | None = None,  # dataset_fingerprint() of the indexed samples
        layer: str | None = None,  # the Grad-CAM layer the maps come from
        target: str = "label",  # the Grad-CAM target rule: "label" or "pred"
    ):
        if members < 1 or samples < 1:
            raise ValueError(f"SaliencyCache needs members >= 1 and samples >= 1, got {members}, {samples}")
        h, w = map_size
        self.members, self.samples, self.map_size = int(members), int(samples), (int(h), int(w))
        self.fingerprint, self.layer, self.target = fingerprint, layer, target
        self.epoch = -1  # epoch of the last publish(); -1 before any
        self.maps = torch.zeros(members, samples, h, w, dtype=torch.float16, device=device)  # readers
        self.valid = torch.zeros(members, samples, dtype=torch.bool, device=device)
        self._pending_maps = torch.zeros_like(self.maps)  # writers
        self._pending_valid = torch.zeros_like(self.valid)
        self._dirty = torch.zeros_like(self.valid)  # written here since the last publish (multi-process sync)

    @property
    def device(self) -> torch.device:
        return self.maps.device

    @property
    def nbytes(self) -> int:
        """Bytes held on the device, both buffers."""
        return 2 * (self.maps.numel() * self.maps.element_size() + self.valid.numel())

    # -- writing -----------------------------------------------------------------------------------

    def _check_member(self, member: int) -> None:
        if not 0 <= member < self.members:
            raise IndexError(f"member {member} out of range for a cache of {self.members} members")

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(indices, device=self.device).long().view(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.samples):
            raise IndexError(
                f"sample indices span [{int(indices.min())}, {int(indices.max())}] "
                f"but the cache holds {self.samples} samples"
            )
        return indices

    def update(
        self,
        member: int,
        indices: torch.Tensor,
        maps: torch.Tensor,
        covered: torch.Tensor | None = None,
        usable: torch.Tensor | None = None,
    ) -> None:
        """Write canonical-frame `maps` (B, h, w), any float dtype, for `indices` (B,) into the pending buffer.

        `covered` (B, h, w) bool, if given, limits the write to those cells (harvest from crops that show
        only part of the image): the other cells keep their previous value. `usable` (B,) bool, if given, marks
        the entries whose map readers may use; the others read as having no map (as before the first refresh).
        """
        self._check_member(member)
        indices = self._check_indices(indices)
        if tuple(maps.shape) != (indices.numel(), *self.map_size):
            raise ValueError(
                f"update: maps of shape {tuple(maps.shape)} for {indices.numel()} indices; "
                f"the cache expects ({indices.numel()}, {self.map_size[0]}, {self.map_size[1]})"
            )
        maps = maps.detach().to(device=self.device, dtype=torch.float16)
        if covered is not None:
            previous = self._pending_maps[member, indices]
            maps = torch.where(covered.to(self.device), maps, previous)
        self._pending_maps[member, indices] = maps
        self._pending_valid[member, indices] = True if usable is None else usable.to(self.device, torch.bool)
        self._dirty[member, indices] = True

    def dirty_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(members (n,), indices (n,), pending maps (n, h, w), usable (n,) bool) written by this process since the
        last publish: what a multi-process run all-gathers before publishing."""
        members, indices = self._dirty.nonzero(as_tuple=True)
        return members, indices, self._pending_maps[members, indices], self._pending_valid[members, indices]

    def write_entries(
        self, members: torch.Tensor, indices: torch.Tensor, maps: torch.Tensor, usable: torch.Tensor | None = None
    ) -> None:
        """Write entries that another process computed (whole maps, already merged there) into the pending buffer."""
        members, indices = members.to(self.device).long(), indices.to(self.device).long()
        self._pending_maps[members, indices] = maps.to(device=self.device, dtype=torch.float16)
        self._pending_valid[members, indices] = True if usable is None else usable.to(self.device, torch.bool)

    def mark_synced(self) -> None:
        """Every process has this process's pending entries now (all-gathered, not yet published)."""
        self._dirty.zero_()

    def publish(self, epoch: int | None = None) -> None:
        """Make everything written so far visible to readers, at once."""
        self.maps.copy_(self._pending_maps)
        self.valid.copy_(self._pending_valid)
        self._dirty.zero_()
        self.epoch = self.epoch + 1 if epoch is None else int(epoch)

    # -- reading -----------------------------------------------------------------------------------

    def peer_members(
        self, rule: str, member: int, count: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Which member's map each of `count` samples uses under a peer rule, (count,) int64 on CPU."""
        self._check_member(member)
        if rule == "self":
            return torch.full((count,), member, dtype=torch.long)
        if rule == "others":
            if self.members < 2:
                raise ValueError("peer rule 'others' needs an ensemble of at least 2 members; use 'self'")
            # A uniform draw over the K - 1 other members: skip over `member` itself.
            draw = torch.randint(0, self.members - 1, (count,), generator=generator)
            return draw + (draw >= member).long()
        raise ValueError(f"peer rule {rule!r} picks no single member; rules are {', '.join(PEER_RULES)}")

    def lookup(
        self,
        members: int | torch.Tensor | str,
        indices: torch.Tensor,
        *,
        member: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Published maps for `indices` (B,): returns (maps (B, h, w) float16, valid (B,) bool).

        `members` is a member id, a (B,) tensor of member ids, or a peer rule evaluated for `member`:
        "self", "others" (a random other member per sample, drawn from `generator`), or "max"
        (element-wise max over every member's valid map).
        """
        indices = self._check_indices(indices)
        if isinstance(members, str):
            if members not in PEER_RULES:
                raise ValueError(f"unknown peer rule {members!r}; rules are {', '.join(PEER_RULES)}")
            if members == "max":
                valid = self.valid[:, indices]  # (K, B)
                maps = torch.where(valid[:, :, None, None], self.maps[:, indices], 0).amax(0)  # (B, h, w)
                return maps, valid.any(0)
            members = self.peer_members(members, member, indices.numel(), generator)
        members = torch.as_tensor(members, device=self.device).long().expand(indices.numel())
        if members.numel() and (int(members.min()) < 0 or int(members.max()) >= self.members):
            raise IndexError(f"member ids span [{int(members.min())}, {int(members.max())}], K={self.members}")
        return self.maps[members, indices], self.valid[members, indices]

    # -- snapshots and checkpoints -----------------------------------------------------------------

    # What ties maps to a run: the samples they index (fingerprint, count), their layout, and how they were made.
    IDENTITY = ("fingerprint", "samples", "map_size", "members", "layer", "target")

    def identity(self) -> dict:
        header = self.header()
        return {key: header[key] for key in self.IDENTITY}

    def state_dict(self) -> dict:
        """Both buffers, the epoch and the header, on the CPU: what a training checkpoint holds to resume exactly."""
        return {
            "header": self.header(),
            "maps": self.maps.cpu(),
            "valid": self.valid.cpu(),
            "pending_maps": self._pending_maps.cpu(),
            "pending_valid": self._pending_valid.cpu(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict, *, source: str = "the cache state") -> None:
        """Restore `state_dict()`: a state of other samples or another layout is a CacheSnapshotError naming each
        difference (`source` names where it came from)."""
        check_header(state["header"], self.identity(), source=source)
        self.maps.copy_(state["maps"])
        self.valid.copy_(state["valid"])
        self._pending_maps.copy_(state["pending_maps"])
        self._pending_valid.copy_(state["pending_valid"])
        self.epoch = state["epoch"]

    def header(self) -> dict:
        return {
            "format_version": self.FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "samples": self.samples,
            "map_size": list(self.map_size),
            "members": self.members,
            "layer": self.layer,
            "target": self.target,
            "epoch": self.epoch,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the published buffer atomically (temporary file, fsync, rename), with a digest of the header
        and the payload together, so that an edited epoch or layer is caught like a flipped map bit."""
        maps = self.maps.cpu().contiguous().view(torch.int16).numpy().tobytes()
        valid = self.valid.cpu().contiguous().numpy().tobytes()
        header = self.header() | {"payload_bytes": len(maps) + len(valid)}
        header["sha256"] = _digest(header, maps + valid)
        header_bytes = json.dumps(header, sort_keys=True).encode()
        with atomic_writer(path) as f:
            f.write(_MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes)
            f.write(maps)
            f.write(valid)

    @staticmethod
    def read_header(path: str | os.PathLike) -> dict:
        """The snapshot's header, without its maps."""
        with open(path, "rb") as f:
            return _read_header(f, Path(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        expect: dict | None = None,
    ) -> SaliencyCache:
        """Read a snapshot; `expect` maps header keys (fingerprint, samples, members, map_size, layer,
        target) to what the caller's run has, and any difference is a CacheSnapshotError naming both."""
        path = Path(path)
        if not path.exists():
            raise CacheSnapshotError(f"no cache snapshot at {path}")
        with open(path, "rb") as f:
            header = _read_header(f, path)
            check_header(header, expect or {}, source=str(path))
            payload = f.read()
        if len(payload) != header["payload_bytes"]:
            raise CacheSnapshotError(
                f"{path}: truncated cache snapshot ({len(payload)} of {header['payload_bytes']} payload bytes)"
            )
        if header["format_version"] == 1:
            intact = hashlib.sha256(payload).hexdigest() == header.get("payload_sha256")
        else:
            intact = _digest({k: v for k, v in header.items() if k != "sha256"}, payload) == header.get("sha256")
        if not intact:
            raise CacheSnapshotError(f"{path}: cache snapshot is corrupted (checksum mismatch)")
        K, N, (h, w) = header["members"], header["samples"], header["map_size"]
        cache = cls(
            K,
            N,
            (h, w),
            device=device,
            fingerprint=header["fingerprint"],
            layer=header["layer"],
            target=header["target"],
        )
        map_bytes = K * N * h * w * 2
        maps = torch.frombuffer(bytearray(payload[:map_bytes]), dtype=torch.int16).view(torch.float16).view(K, N, h, w)
        valid = torch.frombuffer(bytearray(payload[map_bytes:]), dtype=torch.bool).view(K, N)
        # A snapshot holds the published buffer; writers start from it.
        state = dict(
            header=header, maps=maps, valid=valid, pending_maps=maps, pending_valid=valid, epoch=header["epoch"]
        )
        cache.load_state_dict(state, source=str(path))
        return cache


def _read_header(f, path: Path) -> dict:
    magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        raise CacheSnapshotError(f"{path} is not a gutout cache snapshot (bad magic {magic[:8]!r})")
    raw_len = f.read(4)
    if len(raw_len) != 4:
        raise CacheSnapshotError(f"{path}: truncated cache snapshot (no header)")
    (length,) = struct.unpack("<I", raw_len)
    raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheSnapshotError(f"{path}: truncated or corrupted cache snapshot header ({err})") from None
    if not isinstance(header, dict):
        raise CacheSnapshotError(f"{path}: corrupted cache snapshot header (not a JSON object)")
    version = header.get("format_version")
    if version not in SaliencyCache.READABLE_VERSIONS:
        readable = ", ".join(map(str, SaliencyCache.READABLE_VERSIONS))
        raise CacheSnapshotError(f"{path}: snapshot format version {version}, this gutout reads versions {readable}")
    _check_layout(header, path)
    return header


def _is_count(value, lo: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _check_layout(header: dict, path: Path) -> None:
    """The header's sizes are well-formed and agree with its payload length (checked before any allocation)."""
    size = header.get("map_size")
    ok = (
        _is_count(header.get("members"))
        and _is_count(header.get("samples"))
        and isinstance(size, list)
        and len(size) == 2
        and all(_is_count(v) for v in size)
        and _is_count(header.get("payload_bytes"), 0)
        and isinstance(header.get("epoch"), int)
    )
    if not ok:
        raise CacheSnapshotError(f"{path}: corrupted cache snapshot header (sizes missing or malformed)")
    K, N, (h, w) = header["members"], header["samples"], size
    expected = K * N * h * w * 2 + K * N  # float16 maps, then one byte per valid flag
    if header["payload_bytes"] != expected:
        raise CacheSnapshotError(
            f"{path}: corrupted cache snapshot header (payload_bytes {header['payload_bytes']} for "
            f"{K} x {N} maps of {h} x {w}, which take {expected})"
        )


def _digest(header: dict, payload: bytes) -> str:
    """SHA-256 of the header (canonical JSON, without the digest itself) followed by the payload."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(payload)
    return h.hexdigest()


def check_header(header: dict, expect: dict, *, source: str) -> None:
    """Raise CacheSnapshotError listing every key where `header` differs from `expect`."""
    unknown = sorted(set(expect) - set(header))
    if unknown:
        raise ValueError(f"cannot check unknown snapshot key(s): {', '.join(unknown)}")
    diffs = []
    for key, wanted in expect.items():
        have = header[key]
        if key == "map_size":
            wanted = list(wanted)
        if have != wanted:
            diffs.append(f"{key}: snapshot has {have!r}, this run expects {wanted!r}")
    if diffs:
        raise CacheSnapshotError(f"{source} does not match this run: " + "; ".join(diffs))
