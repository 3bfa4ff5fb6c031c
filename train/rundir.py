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
import functools
import os
import subprocess
from pathlib import Path

from gutout.atomic import atomic_write_bytes

from .config import TrainConfig, identity_differences, read_run_config

LOCK = "lock"
CHECKPOINT = "checkpoint.pt"  # written last at each epoch's end: its presence marks a complete checkpoint
# The complete checkpoint before the latest (and its member files) is kept: --resume falls back to it when the
# latest cannot be read (a truncated copy, a damaged disk block).
PREVIOUS_CHECKPOINT = "checkpoint.previous.pt"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir` holds a complete checkpoint, the latest or the one before it."""
    return (run_dir / CHECKPOINT).exists() or (run_dir / PREVIOUS_CHECKPOINT).exists()


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


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse a directory that holds a run (from the moment that run started: its config.yaml) unless this is its
    --resume; a --resume of a run stopped before its first checkpoint must be the same configuration."""
    run_dir, config = cfg.run_dir, cfg.run_dir / "config.yaml"
    if not cfg.resume:
        if has_checkpoint(run_dir) or config.exists():
            raise ResumeMismatch(
                f"{run_dir} already holds a run; pass --resume to continue it, or choose another --name/--out"
            )
    elif config.exists() and not has_checkpoint(run_dir):
        try:
            saved = read_run_config(run_dir).identity()
        except Exception as err:  # noqa: BLE001 - unreadable YAML or a config of another version, named
            raise ResumeMismatch(f"cannot read {config}: {err}; refusing to resume") from None
        differences = identity_differences(saved, cfg.identity())
        if differences:
            diffs = "; ".join(f"{k}: that run has {theirs!r}, this one {mine!r}" for k, theirs, mine in differences)
            raise ResumeMismatch(f"{run_dir} holds another run; refusing to resume: {diffs}")


def record_run(cfg: TrainConfig) -> None:
    """config.yaml and git-revision: written once the run directory is known to hold this run (after a resume's
    checks), so that a refused --resume leaves the directory as it was."""
    import yaml

    atomic_write_bytes(cfg.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=True).encode())
    atomic_write_bytes(cfg.run_dir / "git-revision", (git_revision() + "\n").encode())


@functools.cache
def git_revision() -> str:
    """The commit of the source tree this process runs, "+dirty" when it had uncommitted changes; "unknown"
    outside a git checkout. Asked once per process, when its first run starts (its code is loaded by then):
    in a long `compare`, later commits are not this code."""
    here = Path(__file__).resolve().parent
    try:
        # Installed inside some other repository (a venv in a project), HEAD would be that project's.
        ours = subprocess.run(
            ["git", "ls-files", "--error-unmatch", Path(__file__).name], capture_output=True, timeout=10, cwd=here
        )
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        if ours.returncode != 0 or head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here.parent,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
