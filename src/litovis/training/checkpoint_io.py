"""`SafeCheckpointIO`: checkpoints that survive a kill at any moment and never run code when loaded.

Why a plugin: Lightning 2.6's `TorchCheckpointIO` saves through `_atomic_save`, which serialises the
whole checkpoint into memory and writes it inside an fsspec transaction. For a local path that
transaction writes a `tempfile.mkstemp()` file in the *system* temp directory and `shutil.move`s it
onto the target: nothing is fsynced (a power loss can leave an empty or partial file under the final
name), a /tmp on another filesystem turns the move into a copy (a kill during the copy leaves a
truncated checkpoint under the final name; a small or RAM-backed /tmp fails large saves), and a
killed save leaks its temp file into /tmp. Loading passes `weights_only=None`, which the
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` environment variable turns into a full unpickle.

This plugin writes local checkpoints the POSIX way: a hidden temp file in the target's own directory
(`.<name>.<pid>.<random>.tmp`, never matched by `*.ckpt` globs), flush + fsync, `os.replace`, fsync of
the directory. Every `*.ckpt` name, `last.ckpt` included, therefore holds either the previous
complete file or the new complete file. Leftovers of a killed save of the same name are removed by
the next save of that name. Remote paths (`s3://...`) keep Lightning's writer (object stores put
whole objects).

Loading is always `torch.load(weights_only=True)` (an explicit `weights_only=False` is refused); a
file that cannot be read raises `CorruptCheckpointError` naming it and the newest readable
checkpoint in the same directory. Sharded FSDP checkpoints are directories written by
`torch.distributed.checkpoint` and bypass CheckpointIO; full-state FSDP and DDP checkpoints use it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from litovis.atomic_files import atomic_write

CHECKPOINT_SUFFIX = ".ckpt"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, damaged, or holding more than plain data)."""


def _local_path(path: str | os.PathLike) -> Path | None:
    """The local filesystem path of `path`, or None for remote (fsspec) URLs."""
    from fsspec.implementations.local import LocalFileSystem

    fs = get_filesystem(path)
    if not isinstance(fs, LocalFileSystem):
        return None
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def atomic_torch_save(checkpoint: dict[str, Any], target: Path) -> None:
    """`torch.save` to `target` so that a crash at any point leaves the old file or the new one
    (`litovis.atomic_files.atomic_write`: streamed into a fsynced temp file beside it, renamed)."""
    atomic_write(target, lambda handle: torch.save(checkpoint, handle))


def _archive_intact(path: Path) -> bool:
    """True when `path` is a zip archive (what `torch.save` writes) whose every member passes its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _readable(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path` if every byte checks out and it loads weights-only, else None."""
    if not _archive_intact(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any failure means "not usable"; the caller only wants a usable one
        return None


def newest_readable_checkpoint(directory: str | os.PathLike, exclude: str | os.PathLike | None = None) -> tuple[Path, int | None] | None:
    """(path, global step) of the most recently written readable `*.ckpt` in `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    skip = Path(exclude).resolve() if exclude is not None else None
    candidates = [p for p in directory.glob(f"*{CHECKPOINT_SUFFIX}") if p.is_file() and p.resolve() != skip]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        checkpoint = _readable(candidate)
        if checkpoint is not None:
            step = checkpoint.get("global_step")
            return candidate, int(step) if isinstance(step, int) else None
    return None


def _unreadable_message(path: Path, err: BaseException) -> str:
    text = str(err)
    if not _archive_intact(path):
        reason = "it is truncated or damaged (not a complete checkpoint archive)"
    elif type(err).__name__ == "UnpicklingError" and "weights only" in text.lower():
        detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        reason = "it holds objects other than tensors and plain data, and loading it would run code" + (
            f" ({detail[:200]})" if detail else ""
        )
    else:
        reason = f"it is damaged ({type(err).__name__}: {text.splitlines()[0][:200] if text else ''})"
    alternative = newest_readable_checkpoint(path.parent, exclude=path)
    if alternative is None:
        hint = f"no other readable checkpoint in {path.parent}"
    else:
        alt, step = alternative
        at_step = f" (global step {step})" if step is not None else ""
        hint = f"newest readable checkpoint in that directory: {alt}{at_step}; resume with --ckpt_path {alt}"
    return f"cannot load checkpoint {path}: {reason}; {hint}"


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `torch.load(weights_only=True)`; unreadable files raise
    `CorruptCheckpointError` naming the newest readable alternative in the same directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # torch.load signals damaged input with many unrelated types
        raise CorruptCheckpointError(_unreadable_message(path, err)) from err


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic, durable local writes and weights-only loads (module doc).

    Use it through `trainer.plugins` in the YAML config:
    `plugins: [{class_path: litovis.training.checkpoint_io.SafeCheckpointIO}]`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        local = _local_path(path)
        if local is None or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, local)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                f"refusing to load {path} with weights_only=False: litovis checkpoints hold only tensors "
                "and plain data, and a full unpickle would run any code the file contains"
            )
        local = _local_path(path)
        if local is None:
            with get_filesystem(path).open(str(path), "rb") as handle:
                return torch.load(handle, map_location=map_location, weights_only=True)
        return load_checkpoint_file(local, map_location=map_location)
