"""The learning-rate schedule: linear warm-up, then cosine to a floor, optionally re-warmed once.

Notable: the schedule length is `optimizer.total_steps`, else the trainer's `max_steps`, else the
data module's optimizer steps per epoch times `max_epochs` (never Lightning's
`estimated_stepping_batches`, which makes it drop the saved data-loader state); a run without an
end (`max_epochs: -1` and no step limit) has no schedule length and is refused. A `LossSchedule`
callback with `on_switch: rewarm` restarts the same shape at its switch step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import lightning as L
import torch

from litovis.training.config import OptimizerConfig
from litovis.training.loss_schedule import LossSchedule


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.0, restart: tuple[int, int] | None = None) -> float:
    """LR multiplier at `step`: linear warm-up, then cosine from 1 to `floor` at `total`.

    With `restart=(start, warmup)` the same shape starts over at step `start` (DFT re-warm).
    """
    start, warm = (0, warmup) if restart is None or step < restart[0] else restart
    local, length = step - start, max(1, total - start)
    if local < warm:
        return (local + 1) / (warm + 1)
    progress = min(1.0, (local - warm) / max(1, length - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_length(
    total_steps: int | None, max_steps: int, max_epochs: int | None, steps_per_epoch: Callable[[], int] | None
) -> int:
    """Optimizer steps the schedule spans (see the module doc for the order of the sources).

    Args:
        total_steps: `optimizer.total_steps` (None = not set).
        max_steps: the trainer's `max_steps` (-1 = not set).
        max_epochs: the trainer's `max_epochs` (-1 = no limit).
        steps_per_epoch: optimizer steps in one epoch (called only when needed: it plans the
            epoch's batches); None when there is no data module that can tell.

    Raises:
        ValueError: none of the sources gives a finite length.
    """
    if total_steps is not None:
        return total_steps
    if max_steps and max_steps > 0:
        return max_steps
    if steps_per_epoch is None:
        raise ValueError("set optimizer.total_steps or trainer.max_steps: the schedule length is unknown")
    if max_epochs is None or max_epochs < 1:
        raise ValueError(
            f"trainer.max_epochs is {max_epochs} (no epoch limit) and there is no step limit: the LR schedule "
            "has no length; set optimizer.total_steps or trainer.max_steps"
        )
    return steps_per_epoch() * max_epochs


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, trainer: L.Trainer
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-optimizer-step schedule of `optimizer` for this trainer's run."""
    datamodule = trainer.datamodule
    steps_per_epoch = None
    if datamodule is not None and hasattr(datamodule, "optimizer_steps_per_epoch"):
        steps_per_epoch = partial(datamodule.optimizer_steps_per_epoch, trainer.accumulate_grad_batches)
    total = schedule_length(cfg.total_steps, trainer.max_steps, trainer.max_epochs, steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    loss_schedule = next((c for c in trainer.callbacks if isinstance(c, LossSchedule)), None)
    restart = loss_schedule.schedule_restart() if loss_schedule is not None else None
    factor = partial(lr_factor, total=total, warmup=warmup, floor=cfg.min_lr_ratio, restart=restart)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
