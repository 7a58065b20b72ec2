"""The fast generator's KV cache: one row per prompt, row b's token at position p in slot p.

Keys/values of every layer are `[B, kv_heads, max_len, head_dim]` (heads-first, so a decode
step's attention reads each head's slots contiguously). A forward writes its new keys/values at
`CacheWrite` coordinates; the packed prefill attends among its own new tokens, a decode step over
the cache, or over its first slots through `RowKVCache.prefix`.

A quantised cache (`quantized=True`, opt-in) stores keys/values as float8 e4m3 with one float32
scale per (row, head, slot): half the bytes a decode step reads, which is what bounds its
attention. Only the split-KV decode kernel (`litovis.model.split_kv_decoding`) reads it. The
float8 bits live in uint8 buffers: indexed writes into float8 tensors are not implemented
everywhere, and writing through a dtype view of the buffer made compiled CUDA layers copy the
whole buffer twice per step (measured: the decode step took twice as long).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from litovis.model.config import LLMConfig
from litovis.model.fp8_prefill import quantize_rows


class RowKVCache:
    """Keys/values per layer `[B, kv_heads, max_len, head_dim]`; row b's token at position p sits in slot p.

    A layer's `update` writes at the `CacheWrite` coordinates; what it returns depends on the phase: the
    packed prefill attends among its own new keys/values, a decode step attends over the cache.
    """

    def __init__(self, config: LLMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 quantized: bool = False) -> None:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        layers = config.num_hidden_layers
        stored = torch.uint8 if quantized else dtype  # uint8: float8 e4m3 bits
        # Zeros, not empty: masked slots are still multiplied by zero weights, so they must be finite.
        self.keys = [torch.zeros(shape, dtype=stored, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=stored, device=device) for _ in range(layers)]
        self.key_scales: list[torch.Tensor | None] = [None] * layers
        self.value_scales: list[torch.Tensor | None] = [None] * layers
        if quantized:
            self.key_scales = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(layers)]
            self.value_scales = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(layers)]
        self.batch = batch
        self.max_len = max_len

    @property
    def quantized(self) -> bool:
        return self.key_scales[0] is not None

    def layer(self, index: int) -> RowLayerKV:
        return RowLayerKV(self.keys[index], self.values[index], self.key_scales[index], self.value_scales[index])

    def prefix(self, length: int) -> RowKVCache:
        """The same buffers seen through their first `length` slots (views: writes land in the cache)."""
        view = object.__new__(RowKVCache)
        view.keys = [k[:, :, :length] for k in self.keys]
        view.values = [v[:, :, :length] for v in self.values]
        view.key_scales = [None if s is None else s[:, :, :length] for s in self.key_scales]
        view.value_scales = [None if s is None else s[:, :, :length] for s in self.value_scales]
        view.batch, view.max_len = self.batch, length
        return view


class RowLayerKV:
    """One layer's `RowKVCache` buffers (with their scales when quantised)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None) -> None:
        self.keys, self.values = keys, values
        self.key_scales, self.value_scales = key_scales, value_scales

    def update(self, k: torch.Tensor, v: torch.Tensor,
               write: CacheWrite) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Store k/v `[B', T, kv_heads, D]` (flattened in order) at `write`'s (row, slot) pairs.

        Returns what the queries attend: the new k, v themselves, or (`write.attend_cache`) the
        cache seen as `[B, S, kv_heads, D]`, with its (key, value) scales `[B, kv_heads, S]` when
        quantised (the cache is then float8 e4m3 bits in uint8).
        """
        heads, dim = k.shape[-2:]
        for new, stored, scales in ((k, self.keys, self.key_scales), (v, self.values, self.value_scales)):
            new = new.reshape(-1, heads, dim)
            if scales is None:
                stored[write.rows, :, write.slots] = new.to(stored.dtype)
            else:
                quantized, scale = quantize_rows(new)  # one scale per (token, head)
                stored[write.rows, :, write.slots] = quantized.view(torch.uint8)
                scales[write.rows, :, write.slots] = scale[..., 0]
        if not write.attend_cache:
            return k, v, None
        scales = None if self.key_scales is None else (self.key_scales, self.value_scales)
        return self.keys.transpose(1, 2), self.values.transpose(1, 2), scales


@dataclass(frozen=True)
class CacheWrite:
    """Where the new keys/values of one forward go in a `RowKVCache`."""

    rows: torch.Tensor
    """`[N]` cache row of each new token."""
    slots: torch.Tensor
    """`[N]` cache slot (= position) of each new token."""
    attend_cache: bool
    """True: the queries attend over the whole cache (decode); False: only among the new tokens."""
