"""`LossSchedule`: cross-entropy first, then DFT from a configured optimizer step.

Notable: the loss kind is a pure function of `trainer.global_step`, so a resumed run (or a run
resumed from an SFT checkpoint with a later `dft_from_step`) needs no saved state to pick the right
loss. At the switch the AdamW second moments still reflect the ~10-20x larger CE gradients; the
options are to keep them, reset the optimizer state, or re-warm: restart the LR schedule at the
switch (linear warm-up back to the peak, then cosine to the end) — what a DFT phase resumed from a
late SFT checkpoint needs, since the SFT cosine is close to zero there.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L

SwitchAction = Literal["keep", "reset_optimizer", "rewarm"]


class LossSchedule(L.Callback):
    """Chooses the training loss per optimizer step.

    Args:
        dft_from_step: global step from which DFT replaces CE; None = CE throughout, 0 = DFT
            from the start.
        on_switch: what happens at the switch: `keep` the optimizer state, `reset_optimizer`
            (clear AdamW moments once, at the first micro-batch of the switch step), or `rewarm`
            (the LR schedule restarts at the switch: warm-up over `rewarm_steps`, then cosine).
        rewarm_steps: warm-up length of the restarted schedule; required > 0 with `rewarm`.
    """

    def __init__(self, dft_from_step: int | None = None, on_switch: SwitchAction = "keep", rewarm_steps: int = 0) -> None:
        if dft_from_step is not None and dft_from_step < 0:
            raise ValueError(f"dft_from_step must be >= 0 or null, got {dft_from_step}")
        if on_switch not in ("keep", "reset_optimizer", "rewarm"):
            raise ValueError(f"on_switch must be keep, reset_optimizer or rewarm, got {on_switch!r}")
        if on_switch == "rewarm" and rewarm_steps <= 0:
            raise ValueError("on_switch: rewarm needs rewarm_steps > 0")
        if on_switch != "keep" and not dft_from_step:
            raise ValueError(f"on_switch: {on_switch} needs a switch, i.e. dft_from_step > 0")
        self.dft_from_step = dft_from_step
        self.on_switch = on_switch
        self.rewarm_steps = rewarm_steps
        self._reset_at: int | None = None

    def kind_at(self, step: int) -> str:
        """Loss kind (`ce` or `dft`) used for the optimizer step `step`."""
        return "dft" if self.dft_from_step is not None and step >= self.dft_from_step else "ce"

    def schedule_restart(self) -> tuple[int, int] | None:
        """(step, warm-up steps) where the LR schedule restarts, or None (`rewarm` only)."""
        if self.on_switch != "rewarm":
            return None
        return self.dft_from_step, self.rewarm_steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        pl_module.loss_kind = self.kind_at(step)
        if self.on_switch == "reset_optimizer" and step == self.dft_from_step and self._reset_at != step:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
            self._reset_at = step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.loss_kind = self.kind_at(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        # Never empty: Lightning skips loading a falsy callback state.
        return {"dft_from_step": self.dft_from_step, "on_switch": self.on_switch, "rewarm_steps": self.rewarm_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict != self.state_dict():
            warnings.warn(
                f"LossSchedule differs from the checkpoint's ({state_dict}); using the configured one "
                f"({self.state_dict()}), e.g. an SFT checkpoint continued with DFT",
                stacklevel=2,
            )
