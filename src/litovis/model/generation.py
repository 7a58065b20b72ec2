"""Token selection shared by every generator, and the eager reference generator.

`TokenSelector` turns each step's logits into the next token of every row. Its per-row state
lives in fixed tensors changed only in place and it never branches on tensor values on the
host, so the same code runs eagerly here and inside a captured decode step
(`litovis.model.decoding`). Logit processing follows transformers' semantics and order:
eos suppressed until `min_new_tokens`, repetition penalty (over the tokens generated so far, as
transformers does when generation starts from embeddings), then for sampling temperature,
top-k, top-p.

Sampling is inverse-CDF sampling with one uniform number per (seed, row key, step) from a
counter-based integer hash, not a stateful generator: it is reproducible on any device, safe
to capture in a CUDA graph, and a row's draws do not depend on which batch it shares (predict
keys rows by a hash of the sample id).

Rows stop independently when they produce any eos id (unless `ignore_eos`); a finished row
emits `pad_token_id`. The optional thinking budget mirrors the official Ovis2.5 chat: after
`thinking_budget` new tokens, a row that produced neither `</think>` nor eos is fed
`budget_suffix_ids` (a closing sentence plus `</think>\\n\\n`, as ids) token by token, then
continues; the suffix counts toward `max_new_tokens`. A row whose prompt already holds
`</think>` after its last assistant header (the empty think block of a non-thinking prompt)
starts closed: its answer is never cut by the suffix.

`generate` is the eager reference: left-padded prompts, one padded prefill with full
attention masks, `StaticKVCache`, one eager step at a time. The fast path must equal it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from litovis.model.qwen3 import StaticKVCache

if TYPE_CHECKING:
    from litovis.model.ovis import Ovis2_5

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick new tokens (defaults: greedy, Qwen3 eos/pad ids)."""

    max_new_tokens: int = 512
    """Most tokens generated per row (thinking-budget suffix included)."""
    min_new_tokens: int = 0
    """The eos ids cannot be chosen before this many new tokens (transformers' semantics)."""
    ignore_eos: bool = False
    """Rows do not stop at eos: every row generates `max_new_tokens` (benchmarks)."""
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
    """Seed of sampling (None = drawn from torch's global RNG once per `FastGenerator`, or once per
    `generate` call)."""
    thinking_budget: int | None = None
    """Tokens allowed before the suffix is forced on rows still thinking (None = no budget)."""
    thinking_end_id: int = 151668
    """Id of `</think>`; a row that produced it is no longer thinking."""
    budget_suffix_ids: tuple[int, ...] = ()
    """Ids forced after the budget (must end with `</think>` and newlines, as ids)."""
    assistant_header_ids: tuple[int, ...] = (151644, 77091)
    """Ids of `<|im_start|>assistant`: a `</think>` after the last of them in a prompt means the
    row does not think (budget only)."""

    def validate(self) -> None:
        """Raise on values that make no sense rather than silently ignoring them."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
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
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.thinking_budget is not None:
            if self.thinking_budget < 0:
                raise ValueError(f"thinking_budget must be >= 0, got {self.thinking_budget}")
            if not self.budget_suffix_ids:
                raise ValueError("a thinking_budget needs budget_suffix_ids (closing sentence + '</think>\\n\\n')")
            if not self.assistant_header_ids:
                raise ValueError("a thinking_budget needs assistant_header_ids (the ids of '<|im_start|>assistant')")

    def resolved_seed(self) -> int:
        """The sampling seed: `seed`, or one drawn from torch's global RNG."""
        if self.seed is not None:
            return self.seed
        return int(torch.randint(0, 2**62, ()))


def thinking_closed(input_ids: torch.Tensor, config: GenerationConfig) -> bool:
    """Whether a prompt `[L]` holds `thinking_end_id` after its last assistant header.

    Such a prompt (the non-thinking generation prompt ends with an empty think block) asks for an
    answer without thinking, so no thinking budget applies to it. A prompt without an assistant
    header has no answer begun and is not closed.
    """
    ids = input_ids.cpu()
    header = torch.tensor(config.assistant_header_ids)
    width = header.numel()
    for start in reversed((ids[: max(ids.numel() - width + 1, 0)] == header[0]).nonzero().flatten().tolist()):
        if torch.equal(ids[start:start + width], header):
            return bool((ids[start + width:] == config.thinking_end_id).any())
    return False


def process_logits(logits: torch.Tensor, generated: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to float logits `[B, V]`.

    `generated` `[B, V]` bool marks tokens already produced by each row (needed only with a
    repetition penalty). Filtered tokens get -inf. Greedy decoding uses only the penalty.
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


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in [0, 2**32).

    Multipliers stay below 2**31 so no product leaves int64's range.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x31848BAB) & _M32
    x = x ^ (x >> 14)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def uniform_draws(seed: int, row_keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One float64 number in [0, 1) per row, a pure function of (seed, row key, step)."""
    row_keys = row_keys.long()
    h = _mix32(torch.full_like(row_keys, seed & _M32) ^ _mix32(torch.full_like(row_keys, (seed >> 32) & _M32)))
    h = _mix32(h ^ _mix32(row_keys & _M32))
    h = _mix32(h ^ _mix32((row_keys >> 32) & _M32))
    h = _mix32(h ^ _mix32(step.long().expand_as(row_keys) & _M32))
    return h.double() / 2.0**32


def choose_tokens(logits: torch.Tensor, config: GenerationConfig, seed: int, row_keys: torch.Tensor,
                  step: torch.Tensor) -> torch.Tensor:
    """Next token per row `[B]` from processed logits: argmax, or an inverse-CDF sample.

    The sample is the first token whose cumulative probability (in token-id order, float64)
    exceeds `u * total` for the row's `uniform_draws` number `u`; a token of zero probability
    can never be chosen.
    """
    if not config.do_sample:
        return logits.argmax(dim=-1)
    cdf = logits.float().softmax(dim=-1).double().cumsum(dim=-1)
    target = uniform_draws(seed, row_keys, step) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return tokens.clamp(max=logits.shape[-1] - 1)


class TokenSelector:
    """Per-row selection state of one batch, in fixed tensors that `advance` changes in place.

    `tokens` holds the tokens chosen last (the next decode input), `output[:, :n]` the new tokens,
    `lengths` how many each row produced (eos included), `unfinished` who is still generating.
    `step` is a device scalar, so `advance` never needs the host. `reset` reuses the buffers for
    a new batch.
    """

    def __init__(self, config: GenerationConfig, batch: int, vocab: int, device: torch.device) -> None:
        config.validate()
        self.config = config
        self.seed = config.resolved_seed() if config.do_sample else 0
        long = dict(dtype=torch.long, device=device)
        self.step = torch.zeros((), **long)
        self.tokens = torch.full((batch,), config.pad_token_id, **long)
        self.output = torch.full((batch, config.max_new_tokens), config.pad_token_id, **long)
        self.lengths = torch.zeros(batch, **long)
        self.unfinished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.row_keys = torch.zeros(batch, **long)
        self.eos = torch.tensor(config.eos_token_ids, **long)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.eos_mask[self.eos[self.eos < vocab]] = True
        penalty = config.repetition_penalty != 1.0
        self.generated = torch.zeros(batch, vocab, dtype=torch.bool, device=device) if penalty else None
        self.suffix = torch.tensor(config.budget_suffix_ids or (0,), **long)
        self.closed = torch.zeros(batch, dtype=torch.bool, device=device)
        self.cursor = torch.full((batch,), -1, **long)

    def reset(self, active: torch.Tensor, row_keys: torch.Tensor | None = None,
              closed: torch.Tensor | None = None) -> None:
        """Start a new batch: `active` `[B]` bool marks real rows (others only ever emit pad).

        `row_keys` `[B]` key the sampling draws (default: the row index); `closed` `[B]` bool marks
        rows whose prompt already closed the thinking (`thinking_closed`; default: none).
        """
        self.step.zero_()
        self.tokens.fill_(self.config.pad_token_id)
        self.output.fill_(self.config.pad_token_id)
        self.lengths.zero_()
        self.unfinished.copy_(active)
        if row_keys is None:
            row_keys = torch.arange(active.shape[0])
        self.row_keys.copy_(row_keys)
        if self.generated is not None:
            self.generated.zero_()
        if closed is None:
            self.closed.zero_()
        else:
            self.closed.copy_(closed)
        self.cursor.fill_(-1)

    def advance(self, logits: torch.Tensor) -> None:
        """Choose every row's token from its logits `[B, V]` and update the state in place."""
        config, step, unfinished = self.config, self.step, self.unfinished
        logits = logits.float()
        if config.min_new_tokens > 0:
            logits = logits.masked_fill(self.eos_mask & (step < config.min_new_tokens), float("-inf"))
        processed = process_logits(logits, self.generated, config)
        tokens = choose_tokens(processed, config, self.seed, self.row_keys, step)
        if config.thinking_budget is not None:
            tokens = self._apply_budget(tokens)
        tokens = torch.where(unfinished, tokens, config.pad_token_id)
        self.output.index_copy_(1, step.view(1), tokens[:, None])
        if self.generated is not None:
            column = tokens[:, None]
            self.generated.scatter_(1, column, self.generated.gather(1, column) | unfinished[:, None])
        self.lengths.add_(unfinished.long())
        if not config.ignore_eos:
            unfinished &= ~(tokens[:, None] == self.eos).any(-1)
        self.tokens.copy_(tokens)
        step.add_(1)

    def _apply_budget(self, tokens: torch.Tensor) -> torch.Tensor:
        """Replace `tokens` by the suffix where a row is (or starts) being fed it."""
        config, cursor = self.config, self.cursor
        starts = (self.step == config.thinking_budget) & self.unfinished & ~self.closed
        cursor.copy_(torch.where(starts, 0, cursor))
        feeding = cursor >= 0
        forced = self.suffix[cursor.clamp(0, self.suffix.numel() - 1)]
        tokens = torch.where(feeding, forced, tokens)
        advanced = torch.where(feeding, cursor + 1, cursor)
        cursor.copy_(torch.where(advanced >= self.suffix.numel(), -1, advanced))
        self.closed |= tokens == config.thinking_end_id
        return tokens

    def result(self) -> torch.Tensor:
        """New tokens `[B, n]`, n = the most any row produced (finished rows padded)."""
        return self.output[:, : int(self.lengths.max())]


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
        bad = [i for i in range(mask.shape[0]) if bool((mask[i, 1:] < mask[i, :-1]).any()) or not bool(mask[i, -1])]
        raise ValueError(f"generation needs LEFT-padded prompts ending with a real token; rows {bad} are not")


@torch.no_grad()
def generate(
    model: Ovis2_5,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    grid_thws: torch.Tensor | None,
    config: GenerationConfig,
    row_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """New token ids `[B, n]`, n <= max_new_tokens (stops early once every row has finished).

    `input_ids` `[B, T]` are left-padded prompts with expanded visual spans; `attention_mask`
    `[B, T]` marks real tokens (default: all real). `row_keys` `[B]` key each row's sampling
    draws (default: the row index).
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
    next_position = attention_mask.long().sum(-1, keepdim=True)

    selector = TokenSelector(config, batch, llm.config.vocab_size, device)
    closed = None
    if config.thinking_budget is not None:
        closed = torch.tensor([thinking_closed(input_ids[row][attention_mask[row]], config) for row in range(batch)])
    selector.reset(torch.ones(batch, dtype=torch.bool, device=device),
                   None if row_keys is None else row_keys.to(device), closed)
    selector.advance(llm.logits(hidden[:, -1]))
    for step in range(1, config.max_new_tokens):
        if not bool(selector.unfinished.any()):
            break
        slot = prompt_len + step - 1
        slot_valid[:, slot] = True
        hidden = llm(input_ids=selector.tokens[:, None], position_ids=next_position, attention_mask=slot_valid,
                     cache=cache, cache_slots=torch.tensor([slot], device=device))
        next_position = next_position + 1
        selector.advance(llm.logits(hidden[:, -1]))
    return selector.result()
