"""`SafeCheckpointIO`: atomic durable writes, kill-safety, weights-only loads, clear corrupt-file errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from litovis.training import checkpoint_io
from litovis.training.checkpoint_io import (
    CorruptCheckpointError,
    SafeCheckpointIO,
    load_checkpoint_file,
    newest_readable_checkpoint,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def _age(path: Path, seconds_ago: float) -> None:
    stamp = path.stat().st_mtime - seconds_ago
    os.utime(path, (stamp, stamp))


def test_save_writes_beside_the_target_fsyncs_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:  # noqa: ANN001
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_io.os, "replace", replace)
    target = tmp_path / "checkpoints" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(_checkpoint(3), target)

    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    _, temp, renamed_to = events[1]
    assert Path(temp).parent == target.parent, "the temp file must live on the target's filesystem"
    assert Path(temp).name.startswith(".last.ckpt.") and not temp.endswith(".ckpt")
    assert events[0][1] == temp, "the file's bytes must be on disk before the rename"
    assert events[2][1] == str(target.parent), "the rename must be made durable"
    assert renamed_to == str(target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.full((64, 64), 3.0))
    assert not list(target.parent.glob(".*.tmp"))


def test_a_kill_during_the_write_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(_checkpoint(1), target)
    before = target.read_bytes()
    # The child writes half of the new checkpoint's real bytes, flushes them, and is SIGKILLed.
    child = textwrap.dedent(
        f"""
        import io, os, signal, torch
        from litovis.training.checkpoint_io import SafeCheckpointIO
        real_save = torch.save
        def half_then_die(obj, handle):
            buffer = io.BytesIO(); real_save(obj, buffer); data = buffer.getvalue()
            handle.write(data[: len(data) // 2]); handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half_then_die
        SafeCheckpointIO().save_checkpoint(
            {{"global_step": 2, "state_dict": {{"w": torch.full((64, 64), 2.0)}}}}, {str(target)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]

    assert target.read_bytes() == before
    assert load_checkpoint_file(target)["global_step"] == 1
    leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0, "the half-written bytes went to a temp file"
    SafeCheckpointIO().save_checkpoint(_checkpoint(3), target)
    assert not list(tmp_path.glob(".last.ckpt.*.tmp")), "the next save of the same file removes the leftover"
    assert load_checkpoint_file(target)["global_step"] == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_checkpoint_names_itself_and_the_newest_readable_one(tmp_path: Path, damage: str) -> None:
    io = SafeCheckpointIO()
    for step, age in ((10, 300), (20, 200), (30, 100)):
        io.save_checkpoint(_checkpoint(step), tmp_path / f"step{step:05d}.ckpt")
        _age(tmp_path / f"step{step:05d}.ckpt", age)
    newest = tmp_path / "step00030.ckpt"  # newer than step 20, but damaged too: must be passed over
    newest.write_bytes(newest.read_bytes()[:1000])
    io.save_checkpoint(_checkpoint(40), tmp_path / "last.ckpt")
    last = tmp_path / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) - 700], "garbage": os.urandom(len(data)), "empty": b""}[damage])

    with pytest.raises(CorruptCheckpointError) as info:
        io.load_checkpoint(last)
    message = str(info.value)
    assert str(last) in message
    assert "truncated or damaged" in message
    assert f"{tmp_path / 'step00020.ckpt'} (global step 20)" in message
    assert "step00030" not in message


def test_no_readable_alternative_is_said_plainly(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CorruptCheckpointError, match=f"no other readable checkpoint in {tmp_path}"):
        SafeCheckpointIO().load_checkpoint(last)
    assert newest_readable_checkpoint(tmp_path / "missing") is None


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")


class _RunsCode:
    """Pickles as a call to `os.mkdir(marker)`: loading it fully would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"global_step": 5, "state_dict": {}, "payload": _RunsCode(marker)}, evil)
    # This variable makes torch.load unpickle everything when weights_only is left unset (None),
    # which is what Lightning's own TorchCheckpointIO passes.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CorruptCheckpointError, match="would run code"):
        SafeCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=False"):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()


def test_remote_paths_keep_lightnings_writer(tmp_path: Path) -> None:
    # fsspec's in-memory filesystem stands in for an object store: no temp files, no rename.
    import fsspec

    path = "memory://bucket/run/last.ckpt"
    SafeCheckpointIO().save_checkpoint(_checkpoint(7), path)
    assert fsspec.filesystem("memory").exists("/bucket/run/last.ckpt")
    assert SafeCheckpointIO().load_checkpoint(path)["global_step"] == 7
