"""`StepProbe`: a callback that records, on every rank, what the distributed tests compare.

It runs inside `litovis fit|validate` processes started by the tests (added to the config's
callbacks), and writes `rank{R}.json` into its directory: the losses returned by each
micro-batch grouped by optimizer step, the total gradient norm of each step, how many
micro-batches had no image, and the validation loss after each validation (by global step). With
`save_grads`, rank 0 also writes every step's whole gradients (`grads.pt`, float64).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class StepProbe(L.Callback):
    """Records per-rank training and validation facts (see the module doc).

    Args:
        directory: where `rank{R}.json` (and `grads.pt`) are written.
        save_grads: keep every step's gradients (whole) and save them at the end of training.
    """

    def __init__(self, directory: str, save_grads: bool = False) -> None:
        self.directory = Path(directory)
        self.save_grads = save_grads
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.record: dict[str, Any] = {"losses": {}, "grad_norms": {}, "text_only": 0, "batches": 0, "val_loss": {}}
        self._step = 0

    def _write(self, trainer: L.Trainer) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.record["world_size"] = trainer.world_size
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step
        self.record["batches"] += 1
        self.record["text_only"] += int(batch.pixel_values is None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.record["losses"].setdefault(str(self._step), []).append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = {name: _whole(p.grad).double().cpu() for name, p in pl_module.named_parameters() if p.grad is not None}
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        self.record["grad_norms"][str(trainer.global_step)] = float(norm)
        if self.save_grads:
            self.grads[trainer.global_step] = grads

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.record["val_loss"][str(trainer.global_step)] = float(value)
        self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_grads and trainer.global_rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            torch.save(self.grads, self.directory / "grads.pt")
        self._write(trainer)
