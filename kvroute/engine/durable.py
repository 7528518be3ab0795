"""Files written whole or not at all: a temporary file beside the target, fsync, rename.

A reader (another worker, the next start) sees the old file, the new one, or none, never half of
one; a crash mid-write leaves only a ``*.part`` file that no reader opens.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PART = ".part"
"""Suffix of a file still being written (never read; safe to delete)."""


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a file to write; on a clean exit it is synced and renamed onto ``path``.

    ``mode`` sets the permissions (``mkstemp`` makes the file private). On any exception the
    temporary file is removed and ``path`` is left as it was; OSError (disk full, no
    permission) propagates.
    """
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=PART, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all (see `replacing`)."""
    with replacing(path, mode) as f:
        f.write(data)
