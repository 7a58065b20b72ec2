"""One decode step over a `RowKVCache`, and the fixed buffers that let CUDA graphs replay it.

`decode_logits` runs one token per row through the LLM against the cache, attending over its
first slots; `StaticDecoder` owns the buffers of one (batch, cache length) (the cache, the token
selector, positions) and captures the step once per attended length. `litovis.model.decoding`
drives both; see its docstring for the whole generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from litovis.model.attention import AttentionLayout
from litovis.model.generation import GenerationConfig, TokenSelector
from litovis.model.row_kv_cache import CacheWrite, RowKVCache
from litovis.model.split_kv_decoding import choose_splits, split_kv_available

if TYPE_CHECKING:
    from litovis.model.decoding import DecodeOptions
    from litovis.model.ovis import Ovis2_5
    from litovis.model.qwen3 import Qwen3ForCausalLM

DECODE_ATTENTIONS: tuple[str, ...] = ("sdpa", "matmul", "split_kv")
"""Attention backends a decode step can run over the cache."""


def resolve_decode_attention(name: str, device: torch.device) -> str:
    """The decode attention `name` stands for on `device`: `"auto"` is split_kv where its kernel
    runs, else sdpa; an explicit split_kv that cannot run raises."""
    available = split_kv_available(device)
    if name == "auto":
        return "split_kv" if available else "sdpa"
    if name not in DECODE_ATTENTIONS:
        raise ValueError(f"decode_attention must be auto or one of {', '.join(DECODE_ATTENTIONS)}, got {name!r}")
    if name == "split_kv" and not available:
        raise RuntimeError(f"decode_attention='split_kv' needs Triton and a CUDA device (the model is on "
                           f"{device.type}); choose 'sdpa' or 'matmul'")
    return name


def decode_logits(llm: Qwen3ForCausalLM, cache: RowKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                  rows: torch.Tensor, slot_ids: torch.Tensor, attention: str = "sdpa",
                  length: int | None = None, splits: int = 1) -> torch.Tensor:
    """Logits `[B, V]` of one decode step: token b at position (= cache slot) `positions[b]`.

    `attention` is the attention backend over the cache (`"sdpa"`, `"matmul"` or `"split_kv"`,
    which cuts each row's slots into `splits` pieces); the step attends over the first `length`
    slots (default: all), which must hold every position.
    """
    hidden = llm.model.embed_tokens(tokens[:, None])
    if attention == "split_kv":
        # The kernel reads each row's filled slots only, so it gets the whole cache: a slice of it
        # would be copied into a dense tensor by compiled layers.
        layout = AttentionLayout(causal=True, backend=attention, key_lengths=(positions + 1).to(torch.int32),
                                 key_span=length or cache.max_len, splits=splits)
    else:
        if length is not None:
            cache, slot_ids = cache.prefix(length), slot_ids[:length]
        mask = (slot_ids[None, :] <= positions[:, None])[:, None, None, :]
        layout = AttentionLayout(causal=True, backend=attention, mask=mask)
    write = CacheWrite(rows=rows, slots=positions, attend_cache=True)
    hidden = llm.run_layers(hidden, positions[:, None], layout, cache, write)
    return llm.logits(hidden[:, 0])


class StaticDecoder:
    """Fixed buffers for one (batch, cache length): the cache, the selector, positions, the step.

    `step(length)` runs one decode step attending over the first `length` slots (one of
    `lengths`). On CUDA each length's step is captured in a CUDA graph the first time it is needed,
    right after running that step eagerly (which also meets a compiled layer's new shape outside
    the capture), and replayed from then on; the graphs share one memory pool (they never run at
    once and keep no outputs).
    """

    def __init__(self, model: Ovis2_5, config: GenerationConfig, batch: int, max_len: int,
                 options: DecodeOptions) -> None:
        llm = model.llm
        weight = llm.model.embed_tokens.weight
        device = weight.device
        resolve_decode_attention(options.decode_attention, device)  # raises where split_kv cannot run
        self.llm = llm
        self.cache = RowKVCache(llm.config, batch, max_len, weight.dtype, device, quantized=options.fp8_kv_cache)
        self.selector = TokenSelector(config, batch, llm.config.vocab_size, device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)
        self.slot_ids = torch.arange(max_len, device=device)
        self.logits = torch.zeros(batch, llm.config.vocab_size, dtype=torch.float32, device=device)
        self.attention = options.decode_attention
        multiple = options.attend_multiple
        self.lengths = sorted({min(k * multiple, max_len) for k in range(1, -(-max_len // multiple) + 1)})
        """The attended lengths: multiples of `attend_multiple` and the whole cache."""
        processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.splits = {length: choose_splits(batch, llm.config.num_key_value_heads, length, processors)
                       for length in self.lengths}
        """Pieces per row of each attended length (split_kv attention)."""
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._graphed = options.cuda_graphs and device.type == "cuda"
        if self._graphed:
            self._warm_up()

    def length_for(self, position: int) -> int:
        """The attended length of a step whose furthest row writes cache slot `position`."""
        return next(length for length in self.lengths if length > position)

    def _eager_step(self, length: int) -> None:
        logits = decode_logits(self.llm, self.cache, self.selector.tokens, self.positions, self.rows, self.slot_ids,
                               self.attention, length, self.splits[length])
        self.selector.advance(logits)
        self.positions.add_(1)

    @torch.no_grad()
    def _warm_up(self) -> None:
        """A few eager steps on a side stream before the first capture; the buffers are reset before use."""
        self.selector.reset(torch.zeros_like(self.selector.unfinished))
        self.positions.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._eager_step(self.lengths[0])
        torch.cuda.current_stream().wait_stream(stream)

    def _capture(self, length: int) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                self._eager_step(length)
        except torch.cuda.OutOfMemoryError:
            raise  # the caller may retry with fewer rows
        except RuntimeError as err:
            raise RuntimeError(f"capturing the decode step in a CUDA graph failed ({err}); "
                               "DecodeOptions(cuda_graphs=False) runs the same step eagerly") from err
        self._pool = graph.pool()
        self.graphs[length] = graph

    @torch.no_grad()
    def step(self, length: int) -> None:
        """One decode step on the current buffers, attending over the first `length` slots."""
        graph = self.graphs.get(length)
        if graph is not None:
            graph.replay()
            return
        self._eager_step(length)
        if self._graphed:
            self._capture(length)  # records the next steps of this length; runs nothing now
