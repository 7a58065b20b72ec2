"""Batches for generation over a whole dataset: length-sorted, under row and token budgets.

Prompts are sorted by length, longest first (the largest batch shape, and any out-of-memory
error, comes at once), and cut into batches of at most `max_batch_size` rows whose padded size
(rows x longest prompt) stays within `max_batch_tokens`. Neighbours in that order have similar
lengths, so the static cache (longest prompt + `max_new_tokens` per row) wastes little, and
consecutive batches usually share a shape, which lets `FastGenerator` reuse its captured decode
step. A prompt longer than the token budget runs alone. `litovis predict` plans its batches here
and generates them with `litovis.inference.predictor.Predictor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchBudget:
    """Limits of one generation batch."""

    max_batch_size: int = 64
    """Most rows per batch."""
    max_batch_tokens: int = 131072
    """Most prompt tokens per batch counted padded, rows x longest prompt (bounds the prefill
    work and, with `max_new_tokens`, the KV cache)."""

    def validate(self) -> None:
        """Raise on non-positive limits."""
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")


def plan_batches(lengths: Sequence[int], budget: BatchBudget) -> list[list[int]]:
    """Prompt indices grouped into batches, longest prompts first (ties in input order)."""
    budget.validate()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        rows = len(current) + 1
        if current and (rows > budget.max_batch_size or rows * lengths[current[0]] > budget.max_batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
