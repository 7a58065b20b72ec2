"""Fast batched generation: packed prefill into a per-row static KV cache, then a captured decode step.

One batch of encoded prompts goes through two phases:

- **Prefill without padding.** The prompts are concatenated into one packed row (`cu_seqlens`,
  causal attention that never crosses prompts, varlen flash kernel on CUDA), in chunks of at
  most `max_prefill_tokens` whole prompts. The vision tower runs once per image, inside the
  chunk that holds it. Every layer scatters each prompt's keys/values into its row of the cache,
  slot = position, and only the last position of each prompt reaches the output projection.
  The next chunk's inputs are packed and copied to the GPU while it runs this one (`stage_prefill`).
- **Decode with static shapes.** One token per row against the cache `[B, kv_heads, S, D]`, with
  a per-row mask `slot <= position` and in-place cache writes at each row's position. A step
  attends over the first slots only, up to the batch's furthest position rounded up to
  `attend_multiple`: the cache is sized for `max_new_tokens`, but rows mostly stop far earlier, and
  reading empty slots is what a decode step's attention would spend most of its time on.
  Batch and cache length are padded to buckets (padding rows are inactive and only ever emit
  pad); the step (embedding, layers, head, `TokenSelector.advance`) reads and writes fixed
  buffers only, so on CUDA it is captured once per (batch bucket, cache length, attended length)
  in a `torch.cuda.CUDAGraph` and replayed; a decoder serves every later batch whose cache fits in
  its own. The host syncs only every `sync_every` steps, to stop once every row has finished;
  finished rows keep running harmlessly until then. Attention over the cache folds the query
  heads of each K/V head into one query block (no K/V repeat), through SDPA's fused kernel, two
  batched matmuls or the split-KV Triton kernel (`decode_attention`), the last of which can also
  read a float8 cache (`fp8_kv_cache`). A batch that runs out of GPU memory is generated in halves.

The decode step and its graphs live in `litovis.model.decode_step`. On CPU (or with
`cuda_graphs=False`) the very same step runs eagerly; tests compare it with
the eager reference `litovis.model.generation.generate`. Decoder layers compiled in place
(`Ovis2_5.compile_layers()`, as training does) serve both phases; their first call per shape
happens in an eager step before the capture.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from litovis.model.attention import packed_layout
from litovis.model.decode_step import DECODE_ATTENTIONS, StaticDecoder
from litovis.model.generation import GenerationConfig, thinking_closed
from litovis.model.row_kv_cache import CacheWrite, RowKVCache
from litovis.model.tokens import IMAGE_START_ID, VISUAL_ATOM_ID

if TYPE_CHECKING:
    from litovis.model.ovis import Ovis2_5

log = logging.getLogger(__name__)

DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class PromptInputs(Protocol):
    """One encoded prompt (e.g. `litovis.data.batching.EncodedSample`, what predict passes)."""

    input_ids: torch.Tensor
    """`[L]` ids with expanded visual spans."""
    pixel_values: torch.Tensor | None
    """`[P, 768]` patches of the prompt's images, in span order (None: text only)."""
    grid_thws: torch.Tensor | None
    """`[I, 3]` (t, h, w) in patches per image (None: text only)."""


@dataclass(frozen=True)
class EncodedPrompt:
    """A plain `PromptInputs`."""

    input_ids: torch.Tensor
    """`[L]` ids with expanded visual spans."""
    pixel_values: torch.Tensor | None = None
    """`[P, 768]` patches of the prompt's images, in span order."""
    grid_thws: torch.Tensor | None = None
    """`[I, 3]` (t, h, w) in patches per image."""


@dataclass(frozen=True)
class DecodeOptions:
    """How the fast generator lays out memory and work (none of it changes the tokens)."""

    max_prefill_tokens: int = 16384
    """Most prompt tokens per prefill chunk (whole prompts; a longer prompt runs alone)."""
    batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    """Batch sizes a batch is padded up to (larger batches run at their own size)."""
    cache_multiple: int = 128
    """Cache length (longest prompt + max_new_tokens) is rounded up to a multiple of this."""
    attend_multiple: int = 256
    """A decode step attends over the cache's first slots, the furthest position rounded up to a
    multiple of this (one captured graph per length)."""
    sync_every: int = 16
    """Decode steps between checks whether every row has finished (0 = never check)."""
    cuda_graphs: bool = True
    """Capture the decode step in a CUDA graph (CUDA only; eager elsewhere)."""
    decode_attention: str = "sdpa"
    """Decode-step attention over the cache: `"sdpa"` (fused kernel), `"matmul"` (two batched
    matmuls) or `"split_kv"` (`litovis.model.split_kv_decoding`: Triton, CUDA)."""
    fp8_kv_cache: bool = False
    """Store keys/values as float8 with per-vector scales: half the bytes a decode step reads,
    slightly different answers (needs `decode_attention="split_kv"`)."""

    def validate(self) -> None:
        """Raise on impossible settings."""
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets must be positive sizes, got {self.batch_buckets}")
        if self.cache_multiple < 1:
            raise ValueError(f"cache_multiple must be >= 1, got {self.cache_multiple}")
        if self.attend_multiple < 1:
            raise ValueError(f"attend_multiple must be >= 1, got {self.attend_multiple}")
        if self.sync_every < 0:
            raise ValueError(f"sync_every must be >= 0, got {self.sync_every}")
        if self.decode_attention not in DECODE_ATTENTIONS:
            raise ValueError(f"decode_attention must be one of {', '.join(DECODE_ATTENTIONS)}, "
                             f"got {self.decode_attention!r}")
        if self.fp8_kv_cache and self.decode_attention != "split_kv":
            raise ValueError(f"fp8_kv_cache is read by decode_attention='split_kv' only (Triton on CUDA), "
                             f"not {self.decode_attention!r}")


def bucket_size(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `size` rows (`size` itself beyond the largest bucket)."""
    fitting = [b for b in buckets if b >= size]
    return min(fitting) if fitting else size


def check_prompt(prompt: PromptInputs, index: int, hidden_stride: int = 2) -> None:
    """Raise a `ValueError` naming prompt `index` when its ids and images disagree."""
    ids = prompt.input_ids
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"prompt {index}: input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    spans = int((ids == IMAGE_START_ID).sum())
    atoms = int((ids == VISUAL_ATOM_ID).sum())
    if (prompt.pixel_values is None) != (prompt.grid_thws is None):
        raise ValueError(f"prompt {index}: pixel_values and grid_thws go together")
    grids = prompt.grid_thws
    images = 0 if grids is None else int(grids.shape[0])
    image_atoms = 0 if grids is None else int(grids.prod(-1).sum()) // hidden_stride ** 2
    if spans != images or atoms != image_atoms:
        raise ValueError(f"prompt {index}: {spans} image spans with {atoms} visual atoms in input_ids, but "
                         f"{images} images with {image_atoms} atoms given")


@dataclass(frozen=True)
class PrefillInputs:
    """One prefill chunk's prompts as one packed row, on the device (`stage_prefill`)."""

    ids: torch.Tensor
    """`[T]` ids of the prompts, one after the other."""
    pixels: torch.Tensor | None
    """`[P, 768]` patches of the chunk's images (None: text only)."""
    grids: torch.Tensor | None
    """`[I, 3]` (t, h, w) per image (None: text only)."""
    cu_seqlens: torch.Tensor
    """`[N + 1]` prompt boundaries."""
    positions: torch.Tensor
    """`[T]` position of each token in its prompt (= its cache slot)."""
    rows: torch.Tensor
    """`[T]` cache row of each token."""
    longest: int
    """Tokens of the longest prompt."""


def stage_prefill(prompts: Sequence[PromptInputs], rows: Sequence[int], device: torch.device) -> PrefillInputs:
    """Pack `prompts` (cache `rows`) on the host and start copying them to `device`.

    On CUDA the copies leave pinned memory asynchronously: staging the next chunk while the GPU
    still runs this one hides the host's concatenation and the transfer (about 80 MB of float32
    patches per four 1280² images) instead of leaving the GPU idle between chunks.
    """
    lengths = torch.tensor([int(p.input_ids.numel()) for p in prompts])
    total = int(lengths.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    positions = torch.arange(total) - torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    row_of_token = torch.repeat_interleave(torch.tensor(list(rows)), lengths, output_size=total)
    with_images = [p for p in prompts if p.pixel_values is not None]
    pixels = torch.cat([p.pixel_values for p in with_images]) if with_images else None
    grids = torch.cat([p.grid_thws for p in with_images]) if with_images else None

    def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    return PrefillInputs(move(torch.cat([p.input_ids for p in prompts])), move(pixels), move(grids), move(cu),
                         move(positions), move(row_of_token), int(lengths.max()))


@torch.no_grad()
def prefill_chunk(model: Ovis2_5, inputs: PrefillInputs, cache: RowKVCache) -> torch.Tensor:
    """Run a staged chunk as one packed row, write its K/V into the cache; return last-position logits `[N, V]`."""
    llm = model.llm
    embeds = model.merge_multimodal(inputs.ids[None], inputs.pixels, inputs.grids)
    total = inputs.ids.numel()
    layout = packed_layout(inputs.cu_seqlens, inputs.longest, total, causal=True, backend=llm.attention_backend,
                           device=embeds.device, dtype=embeds.dtype)
    write = CacheWrite(rows=inputs.rows, slots=inputs.positions, attend_cache=False)
    hidden = llm.run_layers(embeds, inputs.positions[None], layout, cache, write)
    return llm.logits(hidden[0, inputs.cu_seqlens[1:] - 1])


def packed_prefill(model: Ovis2_5, prompts: Sequence[PromptInputs], cache: RowKVCache, rows: Sequence[int]) -> torch.Tensor:
    """Run `prompts` as one packed row, write their K/V into cache `rows`; return last-position logits `[N, V]`."""
    return prefill_chunk(model, stage_prefill(prompts, rows, cache.keys[0].device), cache)


class FastGenerator:
    """Generates new tokens for batches of encoded prompts (see the module docstring).

    Keeps the `StaticDecoder` (cache and captured graphs) of the last batch and reuses it while
    batches have its batch bucket and fit its cache. A sampling seed left unset is drawn once, here, so that every
    batch shape's selector shares it and a row's draws do not depend on its batch.
    """

    def __init__(self, model: Ovis2_5, config: GenerationConfig, options: DecodeOptions | None = None) -> None:
        config.validate()
        if config.do_sample and config.seed is None:
            config = replace(config, seed=config.resolved_seed())
        options = options or DecodeOptions()
        options.validate()
        self.model = model
        self.config = config
        self.options = options
        self._decoder: StaticDecoder | None = None
        self._shape: tuple[int, int] | None = None
        self._count = 0
        self._longest = 0
        self._fitting_rows: dict[int, int] = {}  # cache length -> most rows not known to run out of memory
        self.decode_steps = 0
        """Decode steps run so far (for throughput reports)."""

    def _cache_length(self, lengths: Sequence[int]) -> int:
        multiple = self.options.cache_multiple
        return -(-(max(lengths) + self.config.max_new_tokens) // multiple) * multiple

    def _decoder_for(self, batch: int, max_len: int) -> StaticDecoder:
        # A longer cache serves as well (steps attend over a prefix); batches come longest first.
        if self._shape is None or self._shape[0] != batch or self._shape[1] < max_len:
            self._decoder, self._shape = None, None  # free the previous cache and graph first
            self._decoder = StaticDecoder(self.model, self.config, batch, max_len, self.options)
            self._shape = (batch, max_len)
        return self._decoder

    @torch.no_grad()
    def generate(self, prompts: Sequence[PromptInputs], row_keys: Sequence[int] | None = None) -> list[torch.Tensor]:
        """New tokens per prompt (CPU long tensors, eos included when produced).

        `row_keys` key each row's sampling draws (default: the row index in `prompts`). A batch
        that runs out of GPU memory (its KV cache is sized for `max_new_tokens`) is generated in
        halves, with a warning; its rows' tokens are the same either way.
        """
        if not prompts:
            return []
        keys = list(range(len(prompts))) if row_keys is None else [int(key) for key in row_keys]
        rows = len(prompts)
        max_len = self._cache_length([int(p.input_ids.numel()) for p in prompts])
        if rows > self._fitting_rows.get(max_len, rows):
            return self._generate_halves(prompts, keys)
        try:
            self.prefill(prompts, keys)
        except torch.cuda.OutOfMemoryError:
            if rows == 1:
                raise
        else:
            return self.decode()
        # Out of the handler: its traceback no longer holds the failed attempt's tensors.
        self._decoder, self._shape = None, None
        gc.collect()
        torch.cuda.empty_cache()
        self._fitting_rows[max_len] = rows - 1
        log.warning("a generation batch of %d prompts (a KV cache of %d positions) ran out of GPU memory; "
                    "generating it in halves. A smaller data.batching.predict_batch_size or "
                    "model.predict.max_new_tokens avoids the retry.", rows, max_len)
        return self._generate_halves(prompts, keys)

    def _generate_halves(self, prompts: Sequence[PromptInputs], keys: list[int]) -> list[torch.Tensor]:
        half = (len(prompts) + 1) // 2
        return self.generate(prompts[:half], keys[:half]) + self.generate(prompts[half:], keys[half:])

    @torch.no_grad()
    def prefill(self, prompts: Sequence[PromptInputs], row_keys: Sequence[int] | None = None) -> None:
        """First phase of `generate`: set up the batch, run the packed prefill, choose the first tokens."""
        if not prompts:
            raise ValueError("prefill needs at least one prompt")
        stride = self.model.config.vit.hidden_stride
        for index, prompt in enumerate(prompts):
            check_prompt(prompt, index, stride)
        config, options = self.config, self.options
        lengths = [int(p.input_ids.numel()) for p in prompts]
        count = len(prompts)
        decoder = self._decoder_for(bucket_size(count, options.batch_buckets), self._cache_length(lengths))
        selector = decoder.selector

        active = torch.zeros(selector.unfinished.shape[0], dtype=torch.bool)
        active[:count] = True
        keys = torch.arange(active.numel())
        if row_keys is not None:
            keys[:count] = torch.as_tensor(list(row_keys), dtype=torch.long)
        closed = torch.zeros_like(active)
        if config.thinking_budget is not None:
            closed[:count] = torch.tensor([thinking_closed(p.input_ids, config) for p in prompts])
        selector.reset(active, keys, closed)
        decoder.positions.zero_()
        decoder.logits.zero_()
        chunks = _prefill_chunks(lengths, options.max_prefill_tokens)
        device = decoder.logits.device
        staged = stage_prefill(prompts[: chunks[0][1]], range(chunks[0][1]), device)
        for index, (start, end) in enumerate(chunks):
            logits = prefill_chunk(self.model, staged, decoder.cache)
            if index + 1 < len(chunks):  # staged while the GPU runs this chunk
                following = chunks[index + 1]
                staged = stage_prefill(prompts[following[0]:following[1]], range(*following), device)
            decoder.logits[start:end] = logits.float()
        decoder.positions[:count] = torch.tensor(lengths, device=decoder.positions.device)
        selector.advance(decoder.logits)
        self._count = count
        self._longest = max(lengths)

    @torch.no_grad()
    def decode(self, max_steps: int | None = None) -> list[torch.Tensor]:
        """Second phase of `generate`: decode the prefilled batch to the end (or for at most
        `max_steps` steps, for benchmarks); new tokens per prompt."""
        decoder, count, config = self._decoder, self._count, self.config
        if decoder is None or count == 0:
            raise RuntimeError("decode() needs a prefill() first")
        selector = decoder.selector
        every = self.options.sync_every
        # No row can stop before min_new_tokens: checking earlier would only stall the GPU.
        can_stop = not config.ignore_eos and every > 0
        last = config.max_new_tokens if max_steps is None else min(config.max_new_tokens, max_steps + 1)
        for step in range(1, last):
            if can_stop and step % every == 0 and step > config.min_new_tokens and not bool(selector.unfinished.any()):
                break
            # every row advances one slot per step: the longest prompt's row is the furthest
            decoder.step(decoder.length_for(self._longest + step - 1))
            self.decode_steps += 1
        self._count = 0
        produced = selector.lengths[:count].cpu()
        output = selector.output[:count].cpu()
        return [output[i, : int(produced[i])].clone() for i in range(count)]


def _prefill_chunks(lengths: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive `(start, end)` groups of prompts with at most `budget` tokens (one prompt at least)."""
    chunks, start, used = [], 0, 0
    for index, length in enumerate(lengths):
        if index > start and used + length > budget:
            chunks.append((start, index))
            start, used = index, 0
        used += length
    chunks.append((start, len(lengths)))
    return chunks
