"""A full disk as one line naming the path and the free space, whichever writer met it.

Python's writers raise OSError(ENOSPC); torch.save's C++ writer loses errno and raises RuntimeError
("basic_ios::clear", "unexpected pos"), so a failed write with (almost) nothing left on its file system
counts as a full disk too.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

NEARLY_FULL = 1 << 20  # bytes: less than this left after a failed write means the disk filled up
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """Raised in place of the writer's own error; str() is the one line a user sees."""

    def __init__(self, path: os.PathLike | str):
        mount = mount_point(path)
        super().__init__(errno.ENOSPC, f"disk full writing {path}: {human(free_bytes(mount))} free on {mount}")

    def __str__(self) -> str:
        return str(self.strerror)


def mount_point(path: os.PathLike | str) -> Path:
    """The mount point of the file system that holds (or would hold) `path`."""
    p = Path(os.path.realpath(path))  # through symlinks: a folder linked onto another disk
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def free_bytes(path: os.PathLike | str) -> int:
    return shutil.disk_usage(mount_point(path)).free


def human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def is_full(exc: BaseException, path: os.PathLike | str) -> bool:
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return True
    if isinstance(exc, (OSError, RuntimeError)):
        try:
            return free_bytes(path) < NEARLY_FULL
        except OSError:
            return False
    return False


@contextmanager
def writing(path: os.PathLike | str) -> Iterator[None]:
    """Turn a full-disk failure of the block's writes under `path` into DiskFull(path)."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, RuntimeError) as e:
        if is_full(e, path):
            raise DiskFull(path) from e
        raise


@contextmanager
def one_line(*said: type[BaseException]) -> Iterator[None]:
    """For a process's entry point: a full disk, or an exception of the types `said` (whose message says it
    all), ends it with `error: <message>` and exit code 1, not a traceback (the rank's partners are stopped
    by their launcher: deepspeed's, or SLURM's --kill-on-bad-exit)."""
    try:
        yield
    except (DiskFull, *said) as e:
        sys.stderr.write(f"error: {e}\n")  # one write: ranks sharing a pipe (python -u) do not interleave it
        sys.stderr.flush()
        raise SystemExit(1) from None
