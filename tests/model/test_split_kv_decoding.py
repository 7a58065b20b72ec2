"""The split-KV decode kernel against plain softmax attention, alone and inside the fast generator.

The kernel needs Triton and CUDA; without a GPU these tests run through Triton's interpreter:
`TRITON_INTERPRET=1 pytest tests/model/test_split_kv_decoding.py` (with `triton` installed).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from litovis.model.checkpoint import build_ovis
from litovis.model.decode_step import StaticDecoder, decode_logits
from litovis.model.decoding import DecodeOptions, EncodedPrompt, FastGenerator
from litovis.model.fp8_prefill import quantize_rows
from litovis.model.generation import GenerationConfig
from litovis.model.presets import preset
from litovis.model.split_kv_decoding import choose_splits, split_kv_available, split_kv_decode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernel = pytest.mark.skipif(not split_kv_available(DEVICE),
                                  reason="needs Triton and CUDA (or TRITON_INTERPRET=1)")


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q `[B, 1, Hq, D]` over row b's first lengths[b] slots of k, v `[B, Hkv, S, D]`, in float64."""
    batch, _, heads, dim = q.shape
    group = heads // k.shape[1]
    out = torch.empty(batch, 1, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        keys = k[b, :, :n].double().repeat_interleave(group, 0)  # [Hq, n, D]
        values = v[b, :, :n].double().repeat_interleave(group, 0)
        weights = (keys @ q[b, 0].double()[:, :, None])[..., 0] / math.sqrt(dim)
        out[b, 0] = (weights.softmax(-1)[:, None, :] @ values)[:, 0]
    return out


def cache_like(batch: int, slots: int, kv_heads: int, dim: int, dtype: torch.dtype,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V `[B, Hkv, S, D]`, as a `RowKVCache` layer holds them."""
    shape = (batch, kv_heads, slots, dim)
    return torch.randn(shape, generator=gen).to(DEVICE, dtype), torch.randn(shape, generator=gen).to(DEVICE, dtype)


def test_choose_splits_fills_the_gpu_without_pieces_under_the_minimum() -> None:
    assert choose_splits(rows=128, kv_heads=8, slots=2304, multiprocessors=132) == 1
    assert choose_splits(rows=64, kv_heads=8, slots=2304, multiprocessors=132) == 1
    assert choose_splits(rows=16, kv_heads=8, slots=2304, multiprocessors=132) == 3
    assert choose_splits(rows=1, kv_heads=8, slots=600, multiprocessors=132) == 2  # 600 // 256
    assert choose_splits(rows=1, kv_heads=8, slots=100, multiprocessors=132) == 1


@needs_kernel
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_the_kernel_equals_softmax_attention_over_each_rows_filled_slots(splits: int, heads: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(splits)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16  # the interpreter has no bfloat16
    q_heads, kv_heads = heads
    k, v = cache_like(4, 307, kv_heads, 32, dtype, gen)
    q = torch.randn(4, 1, q_heads, 32, generator=gen).to(DEVICE, dtype)
    lengths = torch.tensor([1, 64, 300, 129], dtype=torch.int32, device=DEVICE)
    k[0, :, 1:] = float("nan")  # never read: slots past a row's length
    k[:, :, 300:] = float("nan")  # nor slots past the span
    got = split_kv_decode(q, k, v, lengths, None, None, 32 ** -0.5, 300, splits, block=32)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), softmax_attention(q.cpu(), k.cpu(), v.cpu(), lengths.cpu()),
                               atol=2e-2, rtol=2e-2)


@needs_kernel
@pytest.mark.parametrize(("half_q", "f16_dots"), [(False, True), (True, True), (True, False)])
def test_float8_keys_and_values_are_read_through_their_scales(half_q: bool, f16_dots: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    k, v = cache_like(3, 200, 2, 32, torch.float32, gen)
    q = torch.randn(3, 1, 8, 32, generator=gen).to(DEVICE)
    if half_q:
        q = q.to(torch.bfloat16 if DEVICE.type == "cuda" else torch.float16)  # the interpreter has no bfloat16
    lengths = torch.tensor([200, 17, 90], dtype=torch.int32, device=DEVICE)
    (k8, k_scale), (v8, v_scale) = quantize_rows(k), quantize_rows(v)
    got = split_kv_decode(q, k8, v8, lengths, k_scale[..., 0], v_scale[..., 0], 32 ** -0.5, 200, 2, block=32,
                          f16_dots=f16_dots)
    assert got.dtype == q.dtype
    as_bytes = split_kv_decode(q, k8.view(torch.uint8), v8.view(torch.uint8), lengths, k_scale[..., 0],
                               v_scale[..., 0], 32 ** -0.5, 200, 2, block=32, f16_dots=f16_dots)
    assert torch.equal(as_bytes, got)  # how RowKVCache stores float8: its bits as uint8
    restored_k, restored_v = k8.double() * k_scale.double(), v8.double() * v_scale.double()
    expected = softmax_attention(q.cpu(), restored_k.cpu(), restored_v.cpu(), lengths.cpu())
    tolerance = 2e-2 if half_q else 1e-4  # half precision: the probabilities and the output are rounded
    torch.testing.assert_close(got.double().cpu(), expected, atol=tolerance, rtol=tolerance)
    unquantised = softmax_attention(q.cpu(), k.cpu(), v.cpu(), lengths.cpu())
    assert (got.double().cpu() - unquantised).abs().max() < 0.1  # float8 costs some accuracy, not the answer


@needs_kernel
def test_bad_arguments_raise() -> None:
    q = torch.zeros(1, 1, 4, 24, device=DEVICE)
    k = torch.zeros(1, 2, 8, 24, device=DEVICE)
    lengths = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        split_kv_decode(q, k, k, lengths, None, None, 1.0, 8, 1)
    q, k = q[..., :16].contiguous(), k[..., :16].contiguous()
    with pytest.raises(ValueError, match="go together"):
        split_kv_decode(q, k, k, lengths, torch.ones(1, 2, 8, device=DEVICE), None, 1.0, 8, 1)
    with pytest.raises(ValueError, match="span must be"):
        split_kv_decode(q, k, k, lengths, None, None, 1.0, 9, 1)


def _generation_config(**kwargs) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 8, "eos_token_ids": (511,), "pad_token_id": 0, **kwargs})


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_ovis(preset("tiny"), dtype=torch.float32, device=DEVICE).eval()


def _text_prompts() -> list[EncodedPrompt]:
    gen = torch.Generator().manual_seed(2)
    return [EncodedPrompt(torch.randint(1, 500, (n,), generator=gen)) for n in (5, 19, 11, 2)]


@needs_kernel
def test_a_decode_step_gives_the_logits_of_the_masked_sdpa_step(tiny_model) -> None:
    options = DecodeOptions(decode_attention="split_kv", cuda_graphs=False, attend_multiple=16)
    generator = FastGenerator(tiny_model, _generation_config(), options)
    generator.prefill(_text_prompts())
    decoder: StaticDecoder = generator._decoder
    args = (tiny_model.llm, decoder.cache, decoder.selector.tokens, decoder.positions, decoder.rows,
            decoder.slot_ids)
    expected = decode_logits(*args, "sdpa", 32)
    for splits in (1, 2):
        generator.prefill(_text_prompts())  # the step wrote its keys/values: start again
        got = decode_logits(*args, "split_kv", 32, splits)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_generation_with_split_kv_attention_equals_sdpa_and_a_float8_cache_stays_close(tiny_model) -> None:
    prompts = _text_prompts()
    base = DecodeOptions(cuda_graphs=False, attend_multiple=8)
    config = _generation_config()
    expected = FastGenerator(tiny_model, config, base).generate(prompts)
    split = FastGenerator(tiny_model, config, dataclasses.replace(base, decode_attention="split_kv")).generate(prompts)
    assert [t.tolist() for t in split] == [t.tolist() for t in expected]
    fp8 = dataclasses.replace(base, decode_attention="split_kv", fp8_kv_cache=True)
    quantised = FastGenerator(tiny_model, config, fp8).generate(prompts)
    assert all(t.numel() == 8 for t in quantised)
    assert [t[0] for t in quantised] == [t[0] for t in expected]  # the first token comes from the prefill


def test_a_float8_cache_needs_the_split_kv_kernel() -> None:
    with pytest.raises(ValueError, match="fp8_kv_cache"):
        DecodeOptions(fp8_kv_cache=True).validate()
