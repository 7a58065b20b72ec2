"""RowKVCache: writes land at (row, slot); a prefix is a view of the same buffers."""

from __future__ import annotations

import torch

from litovis.model.presets import preset
from litovis.model.row_kv_cache import CacheWrite, RowKVCache


def test_writes_through_a_prefix_land_in_the_cache_and_decoding_reads_only_the_prefix() -> None:
    config = preset("tiny").llm
    cache = RowKVCache(config, 3, 16, torch.float32, torch.device("cpu"))
    view = cache.prefix(6)
    assert view.max_len == 6 and view.keys[0].shape[2] == 6
    heads, dim = config.num_key_value_heads, config.head_dim
    k, v = torch.randn(2, 1, heads, dim), torch.randn(2, 1, heads, dim)
    write = CacheWrite(rows=torch.tensor([2, 0]), slots=torch.tensor([5, 1]), attend_cache=True)
    keys, values = view.layer(1).update(k, v, write)
    assert keys.shape == (3, 6, heads, dim)  # [B, slots, heads, D] of the prefix only
    torch.testing.assert_close(cache.keys[1][2, :, 5], k[0, 0])
    torch.testing.assert_close(cache.values[1][0, :, 1], v[1, 0])
    assert cache.keys[1].abs().sum() == k.abs().sum() and cache.keys[0].abs().sum() == 0


def test_a_prefill_write_attends_among_its_own_tokens() -> None:
    config = preset("tiny").llm
    cache = RowKVCache(config, 2, 8, torch.float32, torch.device("cpu"))
    k = torch.randn(1, 3, config.num_key_value_heads, config.head_dim)
    write = CacheWrite(rows=torch.tensor([1, 1, 1]), slots=torch.tensor([0, 1, 2]), attend_cache=False)
    keys, _ = cache.layer(0).update(k, k, write)
    assert keys is k
    torch.testing.assert_close(cache.keys[0][1, :, :3].transpose(0, 1), k[0])
