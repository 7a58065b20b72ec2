"""`TokenStats`: running sums of loss, CE, DFT and token accuracy, overall and per task.

Sums (not means) are kept so that any span — one optimizer step over several micro-batches, a
validation epoch over ranks — reduces exactly to per-target-token means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class TokenStats:
    """Accumulates per-token statistics; `n_tasks` slots for per-task sums."""

    FIELDS = ("loss", "ce", "dft", "correct", "targets")

    def __init__(self, n_tasks: int, device: torch.device | str = "cpu") -> None:
        self.n_tasks = n_tasks
        # rows: loss, ce, dft, correct, targets; column n_tasks = all tasks together
        self.sums = torch.zeros(len(self.FIELDS), n_tasks + 1, dtype=torch.float64, device=device)

    def add(self, loss: Tensor, ce: Tensor, dft: Tensor, correct: Tensor, mask: Tensor, token_task: Tensor) -> None:
        """Add per-token values ([N] each); `mask` marks target tokens, `token_task` their task index."""
        values = torch.stack([loss, ce, dft, correct.to(ce.dtype), mask.to(ce.dtype)]).double() * mask
        if self.sums.device != values.device:
            self.sums = self.sums.to(values.device)
        self.sums[:, : self.n_tasks].index_add_(1, token_task, values)
        self.sums[:, self.n_tasks] += values.sum(dim=1)

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """Sum the statistics across processes in place (e.g. `strategy.reduce(t, reduce_op="sum")`)."""
        if all_reduce_sum is not None:
            self.sums = all_reduce_sum(self.sums)

    def means(self, prefix: str, task_names: Sequence[str]) -> dict[str, float]:
        """`{prefix}/loss`, `/ce`, `/dft`, `/token_acc`, and the same per task that has targets."""
        out: dict[str, float] = {}
        columns = [(self.n_tasks, "")] + [(i, f"_{name}") for i, name in enumerate(task_names)]
        for column, suffix in columns:
            targets = self.sums[4, column].item()
            if targets == 0:
                continue
            for row, name in ((0, "loss"), (1, "ce"), (2, "dft"), (3, "token_acc")):
                out[f"{prefix}/{name}{suffix}"] = self.sums[row, column].item() / targets
        return out

    @property
    def targets(self) -> float:
        return self.sums[4, self.n_tasks].item()

    def reset(self) -> None:
        self.sums.zero_()
