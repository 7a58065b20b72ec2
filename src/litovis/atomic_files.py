"""Durable atomic file writes: after a crash at any moment the target holds the old file or the new one.

The POSIX recipe: write a hidden temporary file in the target's own directory (same filesystem,
so the rename is atomic; `.<name>.<pid>.<random>.tmp`, never matched by globs of the real names),
flush and fsync it, `os.replace` it over the target, then fsync the directory so that the rename
itself survives a power loss. Leftover temporaries of a killed write of the same target are removed
by the next write. The file gets the usual permissions (0o666 less the umask), not `mkstemp`'s 0o600.
"""

from __future__ import annotations

import glob
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to disk (directories: not on Windows)."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(target: Path) -> Path:
    """A fresh hidden temporary path next to `target` (same directory, hence same filesystem)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def leftover_temps(target: Path) -> list[Path]:
    """Temporaries of earlier writes of `target` that never completed."""
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.*.tmp"))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace `path` with what `write(handle)` writes to a binary handle, durably.

    The data streams into the temporary file (no copy in memory); if `write` or anything after
    it fails, the temporary is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in leftover_temps(target):
        stale.unlink(missing_ok=True)
    temporary = temp_path(target)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Create or replace `path` with `data`, durably (see `atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))
