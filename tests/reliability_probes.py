"""Callbacks and plugins that reliability tests put into `litovis fit` configs (run in subprocesses).

- `BatchLog`: one JSON line per training micro-batch (epoch, batch index, global step, exact loss,
  sample ids), appended with one `os.write` each, so whatever a SIGKILL interrupts is either a whole
  line or absent.
- `MemoryLog`: resident set size after every optimizer step (for the soak).
- `KillDuringCheckpointWrite`: the real `SafeCheckpointIO`, except that its n-th save writes half
  of the real bytes and then SIGKILLs its own process.
"""

from __future__ import annotations

import io
import json
import os
import signal
from typing import Any
from unittest import mock

import lightning as L
import torch

from litovis.training.checkpoint_io import SafeCheckpointIO


def _append(path: str, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _ids(batch: Any) -> list[str]:
    ids = batch.get("sample_ids") if isinstance(batch, dict) else getattr(batch, "sample_ids", [])
    return list(ids)


class BatchLog(L.Callback):
    """Appends `{epoch, batch, step, loss, ids}` per training micro-batch to `path` (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._step_before = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        _append(self.path, {
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "step": self._step_before,
            "loss": float(loss).hex(),
            "ids": _ids(batch),
        })


def rss_bytes() -> int:
    """Resident set size of this process (Linux `/proc`)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryLog(L.Callback):
    """Appends `{step, rss}` after every optimizer step to `path` (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            _append(self.path, {"step": trainer.global_step, "rss": rss_bytes()})


class KillDuringCheckpointWrite(SafeCheckpointIO):
    """`SafeCheckpointIO` whose `kill_on_save`-th save (1-based) dies halfway through writing."""

    def __init__(self, kill_on_save: int) -> None:
        super().__init__()
        self.kill_on_save = kill_on_save
        self.saves = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.saves += 1
        if self.saves != self.kill_on_save:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        real_save = torch.save

        def half_then_die(obj: Any, handle: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        with mock.patch.object(torch, "save", half_then_die):
            super().save_checkpoint(checkpoint, path, storage_options)
