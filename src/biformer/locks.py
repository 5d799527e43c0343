"""One process per run folder: an exclusive lock held while a run trains.

Two ``biformer train --resume RUN`` of the same run (or two new runs with the same ``--name``) would both
write its checkpoints and metrics; the second is refused in one line naming the process holding the folder.
The lock is the operating system's (``flock`` on ``RUN/.lock``): it is released when the process ends in any
way, a kill included, so a killed run never leaves a stale lock behind. The file is removed when the run
ends normally. Where ``fcntl`` does not exist (Windows) no lock is taken.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_NAME", "RunFolderInUse", "RunLock"]

LOCK_NAME = ".lock"


class RunFolderInUse(FileExistsError):
    """Another process holds the run folder's lock."""


class RunLock:
    """The exclusive lock of run folder ``folder``; ``option`` is what the refusal names (``--resume``)."""

    def __init__(self, folder: str | os.PathLike, option: str = "--resume") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.option = option
        self._descriptor: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderInUse` at once (never waits)."""
        if fcntl is None or self._descriptor is not None:
            return self
        for _ in range(10):  # another process may remove the file between our open and our lock: retry
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise RunFolderInUse(
                    f"{self.option}: the run folder {self.path.parent} is in use by another training process "
                    f"(pid {holder}); wait for it to end or stop it"
                ) from None
            try:
                same_file = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                os.ftruncate(descriptor, 0)
                os.write(descriptor, str(os.getpid()).encode())
                self._descriptor = descriptor
                return self
            os.close(descriptor)
        raise RunFolderInUse(f"{self.option}: cannot lock the run folder {self.path.parent}")

    def release(self) -> None:
        """Remove the lock file and release the lock (nothing happens when it is not held)."""
        if self._descriptor is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: a waiting process then finds a fresh file
        os.close(self._descriptor)
        self._descriptor = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
