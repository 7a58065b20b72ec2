"""FP8 prefill: row-wise quantisation, the long/short input split, and a wrapped tiny Ovis."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from litovis.model.checkpoint import build_ovis
from litovis.model.decoding import EncodedPrompt, FastGenerator, packed_prefill
from litovis.model.fp8_prefill import (
    E4M3_MAX,
    Fp8PrefillLinear,
    disable_fp8_prefill,
    enable_fp8_prefill,
    quantize_rows,
)
from litovis.model.generation import GenerationConfig
from litovis.model.presets import preset
from litovis.model.row_kv_cache import RowKVCache


def test_quantize_rows_keeps_each_rows_largest_value_and_three_mantissa_bits() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen) * torch.tensor([1e-3, 1.0, 50.0, 1e4, 3.0, 0.2])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((6,), E4M3_MAX))
    restored = q.float() * scale
    # e4m3 rounds to 3 mantissa bits (relative error <= 2^-4) above its subnormal range
    normal = x.abs() > scale * 2.0**-6
    assert ((restored - x).abs() <= x.abs() * 2.0**-4 + 1e-12)[normal].all()
    assert not torch.equal(restored, x)


def _linear(gen: torch.Generator, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(64, 32, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(32, generator=gen))
    return linear


def test_long_inputs_take_the_fp8_matmul_and_short_ones_the_wrapped_linear() -> None:
    gen = torch.Generator().manual_seed(1)
    linear = _linear(gen)
    wrapped = Fp8PrefillLinear(linear, min_rows=8)
    short = torch.randn(1, 7, 64, generator=gen)
    assert torch.equal(wrapped(short), linear(short))

    long = torch.randn(2, 5, 64, generator=gen)
    out = wrapped(long)
    assert out.shape == (2, 5, 32)
    q_x, s_x = quantize_rows(long.reshape(10, 64))
    q_w, s_w = quantize_rows(linear.weight)
    expected = (q_x.float() * s_x) @ (q_w.float() * s_w).t() + linear.bias
    torch.testing.assert_close(out.reshape(10, 32), expected, rtol=1e-5, atol=1e-4)
    exact = linear(long)
    error = (out - exact).norm() / exact.norm()
    assert 1e-4 < error < 0.05


def test_sizes_that_are_not_multiples_of_16_raise() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8PrefillLinear(nn.Linear(64, 40), min_rows=1)


def test_an_unmerged_lora_adapter_raises_and_a_merged_one_is_used() -> None:
    gen = torch.Generator().manual_seed(2)
    holder = nn.Module()
    holder.proj = _linear(gen, bias=False)
    holder = inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False), holder)
    with pytest.raises(ValueError, match="unmerged LoRA"):
        Fp8PrefillLinear(holder.proj, min_rows=1)
    x = torch.randn(16, 64, generator=gen)
    with_adapter = holder.proj(x)
    holder.proj.merge()
    wrapped = Fp8PrefillLinear(holder.proj, min_rows=1)
    error = (wrapped(x) - with_adapter).norm() / with_adapter.norm()
    assert error < 0.05  # the FP8 weight is the merged one: without the adapter it would be far off


def _prompts() -> list[EncodedPrompt]:
    gen = torch.Generator().manual_seed(3)
    text = EncodedPrompt(torch.randint(1, 500, (20,), generator=gen))
    ids = torch.cat([torch.randint(1, 500, (3,), generator=gen), torch.tensor([-301] + [-300] * 4 + [-302])])
    image = EncodedPrompt(ids, torch.rand(16, 768, generator=gen) * 2 - 1, torch.tensor([[1, 4, 4]]))
    return [text, image]


def test_a_wrapped_tiny_model_prefills_close_to_the_original_and_still_generates() -> None:
    torch.manual_seed(0)
    model = build_ovis(preset("tiny")).eval()
    fp8 = copy.deepcopy(model)
    assert enable_fp8_prefill(fp8, min_rows=1) == 2 * 7 + 2 * 6  # LLM: q k v o gate up down; ViT: q k v out fc1 fc2
    assert enable_fp8_prefill(fp8, min_rows=1) == 0  # already wrapped
    # the same tensors, each projection's under `.projection` (the FP8 copies are not saved)
    assert {name.replace(".projection.", ".") for name in fp8.state_dict()} == set(model.state_dict())

    prompts = _prompts()
    logits = []
    for candidate in (model, fp8):
        cache = RowKVCache(model.llm.config, 2, 64, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            logits.append(packed_prefill(candidate, prompts, cache, [0, 1]))
    assert not torch.equal(*logits)
    cosine = torch.nn.functional.cosine_similarity(*logits, dim=-1)
    assert (cosine > 0.99).all()

    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, eos_token_ids=(511,), pad_token_id=507)
    tokens = FastGenerator(fp8, config).generate(prompts)
    assert [t.numel() for t in tokens] == [6, 6]
    # Above every input's row count the wrapped model is the original one, exactly.
    exact = copy.deepcopy(model)
    enable_fp8_prefill(exact, min_rows=10_000)
    ours, theirs = FastGenerator(exact, config).generate(prompts), FastGenerator(model, config).generate(prompts)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_disable_puts_the_original_projections_back() -> None:
    model = build_ovis(preset("tiny")).eval()
    before = dict(model.named_modules())
    enable_fp8_prefill(model, min_rows=1)
    assert disable_fp8_prefill(model) == 26
    assert dict(model.named_modules()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_fp8_matmul_equals_the_dequantised_product() -> None:
    gen = torch.Generator(device="cuda").manual_seed(4)
    linear = nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = Fp8PrefillLinear(linear, min_rows=1024)(x)
    assert out.dtype == torch.bfloat16
    q_x, s_x = quantize_rows(x)
    q_w, s_w = quantize_rows(linear.weight)
    expected = (q_x.float() * s_x) @ (q_w.float() * s_w).t() + linear.bias.float()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_compiled_layers_trace_the_fp8_branch() -> None:
    torch.manual_seed(0)
    model = build_ovis(preset("tiny")).eval()
    enable_fp8_prefill(model, min_rows=18)
    prompts = _prompts()
    eager = []
    for rows in (prompts, prompts[:1]):  # 29 and 20 prompt tokens: FP8 in the LLM, bf16 in the 16-patch ViT
        cache = RowKVCache(model.llm.config, 2, 64, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            eager.append(packed_prefill(model, rows, cache, range(len(rows))))
    torch._dynamo.reset()
    model.compile_layers(backend="aot_eager")
    for rows, expected in zip((prompts, prompts[:1]), eager, strict=True):
        cache = RowKVCache(model.llm.config, 2, 64, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            torch.testing.assert_close(packed_prefill(model, rows, cache, range(len(rows))), expected)
    torch._dynamo.reset()
