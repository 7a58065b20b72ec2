"""`NonFiniteGuard`: an optimizer step with a non-finite loss or gradient changes nothing.

One NaN in a loss or a gradient, folded into AdamW's moments, ruins a run for good. This callback
checks every micro-batch's loss (`on_before_backward`, no device sync) and, once all micro-batches
of the optimizer step have run backward, the total gradient norm (`on_before_optimizer_step`,
before clipping). If anything is non-finite the whole step is skipped — with gradient
accumulation one bad micro-batch spoils the summed gradient — by dropping every gradient
(`grad = None`): AdamW then leaves both the weights and its state untouched. The step number is
still consumed (the LR schedule and `global_step` advance, as with AMP's GradScaler), so data
order, loss schedule and resume stay aligned.

Under DDP/FSDP every rank must skip the same steps: the local verdict is max-reduced across ranks
(a NaN loss on one rank with finite gradients elsewhere, or one FSDP shard's inf, skips everywhere).
Each skip is logged with the step, the cause and the `sample_ids` of the offending micro-batches;
`train/skipped_steps` counts them in TensorBoard. After `max_consecutive` skipped steps in a row
the run stops with `NonFiniteTrainingError`: the data or the learning rate needs a look.
With `16-mixed` the GradScaler's overflow steps are counted too (it lowers its scale each time).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor

from litovis.training.sharding import total_norm

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps with a non-finite loss or gradient; stops after too many in a row.

    Args:
        max_consecutive: stop the run after this many skipped optimizer steps in a row.
        max_ids_logged: sample ids listed per skipped micro-batch in the warning.
    """

    def __init__(self, max_consecutive: int = 5, max_ids_logged: int = 32) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.max_ids_logged = max_ids_logged
        self.consecutive = 0
        self.skipped = 0
        self._step = -1
        self._batch_ids: list[list[str]] = []  # per micro-batch of the current optimizer step
        self._loss_finite: list[Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._step:  # first micro-batch of a new optimizer step
            self._step = trainer.global_step
            self._batch_ids, self._loss_finite = [], []
        self._batch_ids.append([str(i) for i in getattr(batch, "sample_ids", [])])

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._loss_finite.append(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = pl_module.device
        grads_finite = (
            torch.isfinite(total_norm([p.grad for p in params])).to(device)
            if params
            else torch.ones((), dtype=torch.bool, device=device)
        )
        losses_finite = torch.stack(self._loss_finite).to(device) if self._loss_finite else torch.ones(1, dtype=torch.bool, device=device)
        bad = (~(losses_finite.all() & grads_finite)).float()
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        if not bad.item():
            self.consecutive = 0
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
            return
        for param in params:
            param.grad = None  # AdamW skips parameters without gradients: no update, no state change
        self.consecutive += 1
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        message = self._describe(trainer, losses_finite.cpu().tolist(), bool(grads_finite.item()))
        log.warning("%s", message)
        if self.consecutive >= self.max_consecutive:
            first = trainer.global_step - self.consecutive + 1
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row (steps {first}-{trainer.global_step}) had a non-finite "
                f"loss or gradient, so none of them changed the weights; stopping. Last one: {message}. "
                "Check those samples, lower optimizer.lr, or raise NonFiniteGuard.max_consecutive."
            )

    def _describe(self, trainer: L.Trainer, losses_finite: list[bool], grads_finite: bool) -> str:
        bad = [i for i, ok in enumerate(losses_finite) if not ok]
        shown = bad if bad else list(range(len(self._batch_ids)))
        parts = []
        for i in shown:
            ids = self._batch_ids[i] if i < len(self._batch_ids) else []
            more = f" +{len(ids) - self.max_ids_logged} more" if len(ids) > self.max_ids_logged else ""
            parts.append(f"micro-batch {i}: sample ids {ids[: self.max_ids_logged]}{more}")
        if bad:
            cause = "non-finite loss"
        elif not grads_finite:
            cause = "non-finite gradient"
        else:
            cause = "non-finite loss or gradient on another rank"
        rank = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
        return (
            f"{rank}optimizer step {trainer.global_step} skipped ({cause}; weights and optimizer state unchanged; "
            f"{self.consecutive} in a row, stop at {self.max_consecutive}); " + "; ".join(parts)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = int(state_dict["consecutive"])
        self.skipped = int(state_dict["skipped"])
