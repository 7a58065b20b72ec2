"""RowKVCache: writes land at (row, slot); a prefix is a view of the same buffers; a quantised cache
stores float8 with per-vector scales."""

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
    keys, values, scales = view.layer(1).update(k, v, write)
    assert scales is None
    assert keys.shape == (3, 6, heads, dim)  # [B, slots, heads, D] of the prefix only
    torch.testing.assert_close(cache.keys[1][2, :, 5], k[0, 0])
    torch.testing.assert_close(cache.values[1][0, :, 1], v[1, 0])
    assert cache.keys[1].abs().sum() == k.abs().sum() and cache.keys[0].abs().sum() == 0


def test_a_prefill_write_attends_among_its_own_tokens() -> None:
    config = preset("tiny").llm
    cache = RowKVCache(config, 2, 8, torch.float32, torch.device("cpu"))
    k = torch.randn(1, 3, config.num_key_value_heads, config.head_dim)
    write = CacheWrite(rows=torch.tensor([1, 1, 1]), slots=torch.tensor([0, 1, 2]), attend_cache=False)
    keys, _, _ = cache.layer(0).update(k, k, write)
    assert keys is k
    torch.testing.assert_close(cache.keys[0][1, :, :3].transpose(0, 1), k[0])


def test_a_quantised_cache_stores_float8_whose_scales_restore_the_written_values() -> None:
    config = preset("tiny").llm
    heads, dim = config.num_key_value_heads, config.head_dim
    cache = RowKVCache(config, 2, 8, torch.float32, torch.device("cpu"), quantized=True)
    assert cache.quantized and cache.keys[0].dtype == torch.uint8  # float8 e4m3 bits
    k, v = torch.randn(1, 3, heads, dim) * 5, torch.randn(1, 3, heads, dim) / 7
    prefill = CacheWrite(rows=torch.tensor([1, 1, 1]), slots=torch.tensor([0, 1, 2]), attend_cache=False)
    new_k, new_v, scales = cache.layer(0).update(k, v, prefill)
    assert new_k is k and new_v is v and scales is None  # the prefill attends its own unquantised k/v

    view = cache.prefix(4)
    step = CacheWrite(rows=torch.tensor([0]), slots=torch.tensor([3]), attend_cache=True)
    k1, v1 = torch.randn(1, 1, heads, dim), torch.randn(1, 1, heads, dim)
    keys, values, (key_scales, value_scales) = view.layer(0).update(k1, v1, step)
    assert keys.shape == (2, 4, heads, dim) and key_scales.shape == (2, heads, 4)
    restored_k = keys.view(torch.float8_e4m3fn).float() * key_scales.transpose(1, 2)[..., None]
    restored_v = values.view(torch.float8_e4m3fn).float() * value_scales.transpose(1, 2)[..., None]
    # e4m3 keeps 3 mantissa bits: within 1/16 of each vector's largest magnitude
    for restored, written in ((restored_k[1, :3], k[0]), (restored_v[1, :3], v[0]),
                              (restored_k[0, 3], k1[0, 0]), (restored_v[0, 3], v1[0, 0])):
        bound = written.abs().amax(-1, keepdim=True) / 16
        assert ((restored - written).abs() <= bound).all()
    assert restored_k[0, :3].abs().sum() == 0  # untouched slots stay zero
