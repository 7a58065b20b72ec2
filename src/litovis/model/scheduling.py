"""Generation over a whole dataset: length-sorted batches under row and token budgets, results in input order.

Prompts are sorted by length, longest first (the largest batch shape, and any out-of-memory
error, comes at once), and cut into batches of at most `max_batch_size` rows whose padded size
(rows x longest prompt) stays within `max_batch_tokens`. Neighbours in that order have similar
lengths, so the static cache (longest prompt + `max_new_tokens` per row) wastes little, and
consecutive batches usually share a shape, which lets `FastGenerator` reuse its captured decode
step. A prompt longer than the token budget runs alone. Results are yielded in input order as
soon as every earlier one is done; sampling draws are keyed by the input index, so a row's
tokens do not depend on the batch it landed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from litovis.model.decoding import DecodeOptions, FastGenerator, PromptInputs, check_prompt
from litovis.model.generation import GenerationConfig

if TYPE_CHECKING:
    from litovis.model.ovis import Ovis2_5


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


@dataclass(frozen=True)
class GenerationResult:
    """New tokens of one prompt."""

    index: int
    """Position of the prompt in the input sequence."""
    token_ids: list[int]
    """Generated ids, the eos included when one was produced."""
    stopped_at_eos: bool
    """True when the row ended with an eos id; False when it ran into `max_new_tokens`."""


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


def generate_dataset(
    model: Ovis2_5,
    prompts: Sequence[PromptInputs],
    config: GenerationConfig,
    budget: BatchBudget | None = None,
    options: DecodeOptions | None = None,
    on_batch: Callable[[list[int]], None] | None = None,
) -> Iterator[GenerationResult]:
    """Generate for every prompt; yield one `GenerationResult` per prompt, in input order.

    Every prompt is checked before any work starts (a bad one raises, naming its index).
    `on_batch` is called with each batch's indices after it has been generated (progress).
    """
    budget = budget or BatchBudget()
    stride = model.config.vit.hidden_stride
    for index, prompt in enumerate(prompts):
        check_prompt(prompt, index, stride)
    batches = plan_batches([int(p.input_ids.numel()) for p in prompts], budget)
    generator = FastGenerator(model, config, options)
    eos = set(config.eos_token_ids)
    ready: dict[int, GenerationResult] = {}
    next_index = 0
    for batch in batches:
        outputs = generator.generate([prompts[i] for i in batch], row_keys=batch)
        for index, tokens in zip(batch, outputs, strict=True):
            ids = tokens.tolist()
            stopped = not config.ignore_eos and bool(ids) and ids[-1] in eos
            ready[index] = GenerationResult(index=index, token_ids=ids, stopped_at_eos=stopped)
        if on_batch is not None:
            on_batch(batch)
        while next_index in ready:
            yield ready.pop(next_index)
            next_index += 1
