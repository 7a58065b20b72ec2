"""Durable atomic writes: the target holds the old or the new file, the rename is fsynced, no temporary lingers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from litovis.atomic_files import atomic_write, atomic_write_bytes


def _record_sync_and_rename(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Log of `fsync file` / `fsync dir` / `replace` calls, in order."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_the_file_is_synced_before_the_rename_and_the_directory_after(tmp_path: Path, monkeypatch) -> None:
    events = _record_sync_and_rename(monkeypatch)
    path = atomic_write_bytes(tmp_path / "deep" / "out.bin", b"\x00data\r\n")
    assert path.read_bytes() == b"\x00data\r\n"
    assert events == ["fsync file", "replace", "fsync dir"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = atomic_write_bytes(tmp_path / "out.txt", b"old")

    def half_then_fail(handle) -> None:
        handle.write(b"new, but only half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_leftovers_of_a_killed_write_are_removed_and_permissions_follow_the_umask(tmp_path: Path) -> None:
    leftover = tmp_path / ".out.txt.123.abcdef012345.tmp"
    leftover.write_bytes(b"half")
    other = tmp_path / ".other.txt.123.abcdef012345.tmp"
    other.write_bytes(b"someone else's")
    path = atomic_write_bytes(tmp_path / "out.txt", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
