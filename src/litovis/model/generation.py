"""Batched generation for Ovis2.5 over left-padded prompts with a static KV cache.

The vision tower runs once, in the prefill; each decode step feeds one token per row against
a cache preallocated for `prompt + max_new_tokens` slots, with shapes that never change (so a
step can later be compiled or captured in a CUDA graph). Logit processing follows transformers'
semantics and order: repetition penalty (over the tokens generated so far, as transformers does
when generation starts from embeddings), then for sampling temperature, top-k, top-p.

Rows stop independently when they produce any eos id; a finished row emits `pad_token_id`.
The optional thinking budget mirrors the official Ovis2.5 chat: after `thinking_budget` new
tokens, a row that produced neither `</think>` nor eos is fed `budget_suffix_ids` (a closing
sentence plus `</think>\\n\\n`, as ids) token by token, then continues; the suffix counts
toward `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from litovis.model.qwen3 import StaticKVCache

if TYPE_CHECKING:
    from litovis.model.ovis import Ovis2_5


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick new tokens (defaults: greedy, Qwen3 eos/pad ids)."""

    max_new_tokens: int = 512
    """Most tokens generated per row (thinking-budget suffix included)."""
    do_sample: bool = False
    """Sample from the processed distribution; False = greedy argmax."""
    temperature: float = 1.0
    """Divides the logits before sampling (sampling only)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off; sampling only)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1.0 = off; sampling only)."""
    repetition_penalty: float = 1.0
    """transformers' penalty on already generated tokens (1.0 = off)."""
    eos_token_ids: tuple[int, ...] = (151645, 151643)
    """A row stops after producing any of these (`<|im_end|>`, `<|endoftext|>`)."""
    pad_token_id: int = 151643
    """Emitted by rows that have finished."""
    seed: int | None = None
    """Seed of the sampling generator (None = the global RNG)."""
    thinking_budget: int | None = None
    """Tokens allowed before the suffix is forced on rows still thinking (None = no budget)."""
    thinking_end_id: int = 151668
    """Id of `</think>`; a row that produced it is no longer thinking."""
    budget_suffix_ids: tuple[int, ...] = ()
    """Ids forced after the budget (must end with `</think>` and newlines, as ids)."""

    def validate(self) -> None:
        """Raise on values that make no sense rather than silently ignoring them."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids must not be empty")
        if self.thinking_budget is not None:
            if self.thinking_budget < 0:
                raise ValueError(f"thinking_budget must be >= 0, got {self.thinking_budget}")
            if not self.budget_suffix_ids:
                raise ValueError("a thinking_budget needs budget_suffix_ids (closing sentence + '</think>\\n\\n')")


def process_logits(logits: torch.Tensor, generated: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to float logits `[B, V]`.

    `generated` `[B, V]` bool marks tokens already produced by each row. Filtered tokens get
    -inf. Greedy decoding uses only the repetition penalty.
    """
    if config.repetition_penalty != 1.0:
        penalty = config.repetition_penalty
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(generated, penalized, logits)
    if not config.do_sample:
        return logits
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1.0 - config.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, config: GenerationConfig, rng: torch.Generator | None) -> torch.Tensor:
    """Next token per row `[B]` from processed logits: argmax, or a sample when `do_sample`."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(1)


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
        bad = [i for i in range(mask.shape[0]) if bool((mask[i, 1:] < mask[i, :-1]).any()) or not bool(mask[i, -1])]
        raise ValueError(f"generation needs LEFT-padded prompts ending with a real token; rows {bad} are not")


class _ThinkingBudget:
    """Per-row state of the thinking budget: who has closed thinking, who is being fed the suffix."""

    def __init__(self, config: GenerationConfig, batch: int, device: torch.device) -> None:
        self.budget = config.thinking_budget
        self.end_id = config.thinking_end_id
        self.suffix = torch.tensor(config.budget_suffix_ids or (0,), device=device)
        self.closed = torch.zeros(batch, dtype=torch.bool, device=device)
        self.cursor = torch.full((batch,), -1, dtype=torch.long, device=device)

    def apply(self, step: int, tokens: torch.Tensor, unfinished: torch.Tensor) -> torch.Tensor:
        """Replace `tokens` by the suffix where a row is (or starts) being fed it."""
        if self.budget is None:
            return tokens
        if step == self.budget:
            self.cursor = torch.where(unfinished & ~self.closed, torch.zeros_like(self.cursor), self.cursor)
        feeding = self.cursor >= 0
        forced = self.suffix[self.cursor.clamp(0, self.suffix.numel() - 1)]
        tokens = torch.where(feeding, forced, tokens)
        self.cursor = torch.where(feeding, self.cursor + 1, self.cursor)
        self.cursor = torch.where(self.cursor >= self.suffix.numel(), torch.full_like(self.cursor, -1), self.cursor)
        self.closed |= tokens == self.end_id
        return tokens


@torch.no_grad()
def generate(
    model: Ovis2_5,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    grid_thws: torch.Tensor | None,
    config: GenerationConfig,
) -> torch.Tensor:
    """New token ids `[B, n]`, n <= max_new_tokens (stops early once every row has finished).

    `input_ids` `[B, T]` are left-padded prompts with expanded visual spans; `attention_mask`
    `[B, T]` marks real tokens (default: all real).
    """
    config.validate()
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(device).bool()
    _check_left_padded(attention_mask)
    llm = model.llm
    total = prompt_len + config.max_new_tokens

    embeds = model.merge_multimodal(input_ids, pixel_values, grid_thws)
    cache = StaticKVCache(llm.config, batch, total, embeds.dtype, device)
    slot_valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    slot_valid[:, :prompt_len] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = llm(inputs_embeds=embeds, position_ids=positions, attention_mask=slot_valid, cache=cache,
                 cache_slots=torch.arange(prompt_len, device=device))
    logits = llm.logits(hidden[:, -1]).float()
    next_position = attention_mask.long().sum(-1, keepdim=True)

    rng = None
    if config.seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(config.seed)
    eos = torch.tensor(config.eos_token_ids, device=device)
    pad = torch.full((batch,), config.pad_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    generated = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=device)
    budget = _ThinkingBudget(config, batch, device)
    new_tokens = []
    for step in range(config.max_new_tokens):
        tokens = choose_tokens(process_logits(logits, generated, config), config, rng)
        tokens = budget.apply(step, tokens, unfinished)
        tokens = torch.where(unfinished, tokens, pad)
        new_tokens.append(tokens)
        generated[torch.arange(batch, device=device), tokens] |= unfinished
        unfinished = unfinished & ~torch.isin(tokens, eos)
        if step + 1 == config.max_new_tokens or not bool(unfinished.any()):
            break
        slot = prompt_len + step
        slot_valid[:, slot] = True
        hidden = llm(input_ids=tokens[:, None], position_ids=next_position, attention_mask=slot_valid,
                     cache=cache, cache_slots=torch.tensor([slot], device=device))
        next_position = next_position + 1
        logits = llm.logits(hidden[:, -1]).float()
    return torch.stack(new_tokens, dim=1)
