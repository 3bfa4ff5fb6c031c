"""A run directory belongs to one process at a time.

The process that writes a run (rank 0 of a multi-process run) holds an exclusive `flock` on `<run>/lock` from
before its first write to its exit. The kernel releases it when the process dies, however it dies, so a
SIGKILLed run never leaves a stale lock; the file itself stays and records the last holder's PID, which the
refusal names. A second process asking for the same directory is refused at once, before it writes anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

LOCK = "lock"


class ResumeMismatch(RuntimeError):
    """The run directory holds another run (or a damaged one); the message names the differences or the file."""


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory."""


class RunDirectoryError(RuntimeError):
    """The run directory cannot be created or written; the message names it and the reason."""


class RunDirectoryLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunDirectoryLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            reason = describe_os_error(err)
            raise RunDirectoryError(f"cannot create the run directory {self.run_dir}: {reason}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                reason = describe_os_error(err)
                raise RunDirectoryError(f"cannot lock the run directory {self.run_dir}: {reason}") from None
            raise RunDirectoryBusy(
                f"{self.run_dir} is in use by another run (process {holder}); wait for it to end, or choose another "
                "--name/--out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err`: itself, or one it was raised from (torch.save wraps ENOSPC in a RuntimeError)."""
    seen = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


ADVICE = {
    errno.ENOSPC: "free some space, then continue with --resume",
    errno.EDQUOT: "free some space, then continue with --resume",
    errno.EROFS: "choose a writable --out",
    errno.EACCES: "choose an --out you may write to",
    errno.EPERM: "choose an --out you may write to",
}


def describe_os_error(err: BaseException) -> str:
    """The reason behind `err` in a few words (the OSError's, when there is one) and what to do about it."""
    cause = os_error_in(err)
    if cause is None:
        return str(err)
    advice = ADVICE.get(cause.errno)
    return os.strerror(cause.errno) + (f"; {advice}" if advice else "")


@contextlib.contextmanager
def writing(what: str, note: str = ""):
    """Turn a failed write of `what` (an OSError, possibly wrapped) into one RunDirectoryError naming it; `note`
    says what survived."""
    try:
        yield
    except Exception as err:
        if os_error_in(err) is None:
            raise
        reason = describe_os_error(err) + (f"; {note}" if note else "")
        raise RunDirectoryError(f"cannot write {what}: {reason}") from None
