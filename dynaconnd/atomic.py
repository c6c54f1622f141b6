"""Write files so that readers see the old content or the new, never half."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["PRIVATE_FILE_MODE", "atomic_write"]

#: Mode for files that hold credentials: owner read and write only.
PRIVATE_FILE_MODE = 0o600


def atomic_write(path: str | Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` in one step.

    The temporary file lives in the same folder, so ``os.replace`` is a
    rename within one file system; it is fsynced before the rename and
    the folder after it, so a crash leaves one whole version on disk.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".dynaconn-tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
