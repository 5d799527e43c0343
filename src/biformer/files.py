"""Files written safely: atomically (temporary file, flush, rename) and with errors that name the path.

Every write goes to a temporary file in the same folder that is then renamed over the target
(``os.replace`` is atomic), so a crash during a save (a kill, a full disk) leaves the previous file intact;
a write that fails raises :class:`WriteError` naming the file. Temporary files left by a killed process
are removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["WriteError", "atomic_write", "check_writable_folder", "make_folder", "remove_stale_temporaries"]

TEMPORARY_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file or folder of a run that cannot be written (not a folder, not writable, disk full).

    The message names the path and the reason; a file being replaced keeps its previous version.
    """


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


def _os_error_behind(error: BaseException) -> OSError | None:
    """The ``OSError`` that caused ``error``: itself or one in its chain (``torch.save`` re-raises a failed
    write of its file object as a ``RuntimeError`` whose context is the ``OSError``)."""
    for _ in range(10):
        if error is None or isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _sync_to_disk(path: Path) -> None:
    """Flush the file's data to the disk, so the rename never exposes a file whose data is still cached."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, flush it to the disk, then rename the temporary file to ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` is untouched.

    Raises:
        WriteError: ``write``, the flush or the rename failed because of an ``OSError`` (no space left on
            the device, file too large, permission denied ...); the message names ``path`` and the reason.
    """
    path = Path(path)
    temporary = _temporary_name(path)
    try:
        write(temporary)
        _sync_to_disk(temporary)
        os.replace(temporary, path)
    except WriteError:
        raise
    except Exception as error:
        cause = _os_error_behind(error)
        if cause is None:
            raise
        kept = "its previous version is kept" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path} ({cause.strerror or cause}); {kept}") from error
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed process left in ``folder`` (``.NAME.PID.tmp`` of another PID)."""
    removed = []
    for candidate in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if candidate.is_file() and not candidate.name.endswith(f".{os.getpid()}{TEMPORARY_SUFFIX}"):
            candidate.unlink()
            removed.append(candidate)
    return removed


def check_writable_folder(folder: str | os.PathLike, option: str) -> None:
    """Refuse early a folder that cannot be created or written, without creating anything.

    Looks at ``folder`` or, when it does not exist yet, its nearest existing parent: it must be a folder
    that this process may write in (``os.access``; root may write anywhere).

    Raises:
        WriteError: naming ``option``, the folder and what is wrong.
    """
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{option}: cannot create {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WriteError(f"{option}: cannot write in {existing} (permission denied); choose another folder")


def make_folder(folder: str | os.PathLike, option: str) -> Path:
    """``mkdir -p folder``; raises :class:`WriteError` naming ``option`` and the reason when it fails."""
    folder = Path(folder)
    check_writable_folder(folder, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(f"{option}: cannot create {folder} ({error.strerror or error})") from error
    return folder
