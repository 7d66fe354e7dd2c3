"""One process per output folder: an exclusive OS lock (flock) on `FOLDER/.adapt-lock`.

The OS releases it when the holder dies, so a killed run never blocks the next one; the file records
who holds it (pid, host, start time) so that a refused run can name the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from adapt.core.errors import AdaptError
from adapt.core.ownership import host

LOCK = ".adapt-lock"


class OutputLock:
    """Held from `lock_output` until `release` (or the process's end)."""

    def __init__(self, folder: Path, fd: int, created: tuple[bool, bool]) -> None:
        self.folder, self.fd = folder, fd
        self.created_folder, self.created_file = created

    def __del__(self) -> None:  # a session dropped without `run` (a notebook, a test)
        self.release()

    def release(self, abandon: bool = False) -> None:
        """Unlock. `abandon`: the run never started, so the lock file (and the folder, if this run created
        them and it is empty) go too: a refused run leaves nothing behind."""
        if self.fd < 0:
            return
        if abandon and self.created_file:
            (self.folder / LOCK).unlink(missing_ok=True)
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = -1
        if abandon and self.created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def lock_output(folder: Path, what: str) -> OutputLock:
    """Take `folder` (created if missing) for this process, or refuse naming the process that holds it."""
    created_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    created_file = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise AdaptError(
            f"{what} {folder} is in use by another adapt run ({holder}); wait for it to end or choose "
            f"another {what}"
        ) from None
    os.ftruncate(fd, 0)
    record = {"pid": os.getpid(), "host": host(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return OutputLock(folder, fd, (created_folder, created_file))


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"


@contextlib.contextmanager
def abandoned_on_error(lock: OutputLock | None) -> Iterator[None]:
    """Release `lock` as abandoned when the block raises (the run did not start)."""
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.release(abandon=True)
        raise
