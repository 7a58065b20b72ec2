"""The fast generator's KV cache: one row per prompt, row b's token at position p in slot p.

Keys/values of every layer are `[B, kv_heads, max_len, head_dim]` (heads-first, so a decode
step's attention reads each head's slots contiguously). A forward writes its new keys/values at
`CacheWrite` coordinates; the packed prefill attends among its own new tokens, a decode step over
the cache, or over its first slots through `RowKVCache.prefix`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from litovis.model.config import LLMConfig


class RowKVCache:
    """Keys/values per layer `[B, kv_heads, max_len, head_dim]`; row b's token at position p sits in slot p.

    A layer's `update` writes at the `CacheWrite` coordinates; what it returns depends on the phase: the
    packed prefill attends among its own new keys/values, a decode step attends over the cache.
    """

    def __init__(self, config: LLMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        # Zeros, not empty: masked slots are still multiplied by zero weights, so they must be finite.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.batch = batch
        self.max_len = max_len

    def layer(self, index: int) -> RowLayerKV:
        return RowLayerKV(self.keys[index], self.values[index])

    def prefix(self, length: int) -> RowKVCache:
        """The same buffers seen through their first `length` slots (views: writes land in the cache)."""
        view = object.__new__(RowKVCache)
        view.keys = [k[:, :, :length] for k in self.keys]
        view.values = [v[:, :, :length] for v in self.values]
        view.batch, view.max_len = self.batch, length
        return view


class RowLayerKV:
    """One layer's `RowKVCache` buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor, write: CacheWrite) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v `[B', T, kv_heads, D]` (flattened in order) at `write`'s (row, slot) pairs."""
        heads, dim = k.shape[-2:]
        self.keys[write.rows, :, write.slots] = k.reshape(-1, heads, dim).to(self.keys.dtype)
        self.values[write.rows, :, write.slots] = v.reshape(-1, heads, dim).to(self.values.dtype)
        if write.attend_cache:
            return self.keys.transpose(1, 2), self.values.transpose(1, 2)
        return k, v


@dataclass(frozen=True)
class CacheWrite:
    """Where the new keys/values of one forward go in a `RowKVCache`."""

    rows: torch.Tensor
    """`[N]` cache row of each new token."""
    slots: torch.Tensor
    """`[N]` cache slot (= position) of each new token."""
    attend_cache: bool
    """True: the queries attend over the whole cache (decode); False: only among the new tokens."""
