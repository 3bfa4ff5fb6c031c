"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _process_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _process_umask()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, keep_replaced_as: str | os.PathLike | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file in `path`'s folder; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is untouched. With `keep_replaced_as`, the file that
    `path` held becomes that file (`atomic_preserve`) once the new bytes are on disk, just before the rename: until
    then `keep_replaced_as` still holds the file before it, so the two names hold two different complete files at
    every moment but the one between two renames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp makes the file 0600; the result gets the mode a plain open() would give it (or the replaced
    # file's), so that a run directory stays readable by whoever could read it before.
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        if keep_replaced_as is not None and path.exists():
            atomic_preserve(path, keep_replaced_as)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the directory entry is on disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_preserve(path: str | os.PathLike, keep: str | os.PathLike) -> None:
    """Make `keep` a copy of `path` atomically (a reader sees the old `keep` or the whole copy): a hard link where
    the filesystem has them, else a byte copy. `path` itself is untouched."""
    path, keep = Path(path), Path(keep)
    tmp = keep.parent / f".{keep.name}.{os.getpid()}.link"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here (some network and FUSE filesystems): copy the bytes
        with open(path, "rb") as src, atomic_writer(keep) as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        return
    os.replace(tmp, keep)
