"""Our Qwen3 against transformers' Qwen3ForCausalLM, packing, KV cache and activation checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM as HFQwen3

from litovis.model.attention import padded_layout
from litovis.model.config import LLMConfig
from litovis.model.presets import preset
from litovis.model.qwen3 import Qwen3ForCausalLM, StaticKVCache, rotary_cos_sin


def _pair(tied: bool = False) -> tuple[Qwen3ForCausalLM, HFQwen3]:
    config: LLMConfig = dataclasses.replace(preset("tiny").llm, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf_config = Qwen3Config(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    hf = HFQwen3(hf_config).eval()
    with torch.no_grad():  # transformers initialises norms to one: make them informative
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    ours = Qwen3ForCausalLM(config)
    state = hf.state_dict()
    if tied:  # transformers lists the shared tensor twice; the checkpoint stores it once
        assert state.pop("lm_head.weight").data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    ours.load_state_dict(state, strict=True)
    return ours, hf


def test_parameter_names_follow_transformers() -> None:
    ours, hf = _pair()
    assert list(ours.state_dict()) == list(hf.state_dict())
    for name, module in ours.named_modules():
        if name.endswith(("_proj", "lm_head")):
            assert type(module) is torch.nn.Linear, name


@pytest.mark.parametrize("tied", [False, True])
def test_padded_batch_logits_equal_transformers(tied: bool) -> None:
    ours, hf = _pair(tied)
    if tied:
        assert not hasattr(ours, "lm_head") and "lm_head.weight" not in ours.state_dict()
    ids = torch.randint(0, 512, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours.logits(ours(input_ids=ids, attention_mask=mask))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_packed_row_equals_transformers_per_sample() -> None:
    ours, hf = _pair()
    lengths = [6, 3, 8]
    ids = torch.randint(0, 512, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    with torch.no_grad():
        packed = ours.logits(ours(input_ids=ids, cu_seqlens=cu, max_seqlen=max(lengths)))
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            alone = hf(input_ids=ids[:, start:end]).logits
            torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-5, atol=1e-5)


def test_packed_positions_restart_per_sample_by_default() -> None:
    ours, _ = _pair()
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    explicit = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, cu_seqlens=cu), ours(input_ids=ids, cu_seqlens=cu, position_ids=explicit))


def test_packed_length_mismatch_is_reported() -> None:
    ours, _ = _pair()
    with pytest.raises(ValueError, match="cu_seqlens ends at 5"):
        ours(input_ids=torch.zeros(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_kv_cache_decoding_equals_full_forward() -> None:
    ours, _ = _pair()
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        full = ours.logits(ours(input_ids=ids, attention_mask=mask))
        cache = StaticKVCache(ours.config, 2, 12, torch.float32, torch.device("cpu"))
        valid = torch.zeros(2, 12, dtype=torch.bool)
        valid[:, :7] = mask[:, :7]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        prefill = ours.logits(ours(input_ids=ids[:, :7], position_ids=positions[:, :7], attention_mask=valid,
                                   cache=cache, cache_slots=torch.arange(7)))
        torch.testing.assert_close(prefill[mask[:, :7]], full[:, :7][mask[:, :7]], rtol=1e-5, atol=1e-5)
        for slot in range(7, 10):
            valid[:, slot] = True
            step = ours.logits(ours(input_ids=ids[:, slot:slot + 1], position_ids=positions[:, slot:slot + 1],
                                    attention_mask=valid, cache=cache, cache_slots=torch.tensor([slot])))
            torch.testing.assert_close(step[:, 0], full[:, slot], rtol=1e-5, atol=1e-5)


def _saved_tensor_count(model: Qwen3ForCausalLM, embeds: torch.Tensor) -> tuple[int, torch.Tensor]:
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.logits(model(inputs_embeds=embeds)).float().pow(2).mean()
    return count, loss


@pytest.mark.parametrize("num_layers", [None, 1])
def test_checkpointing_with_frozen_inputs_saves_memory_and_keeps_grads(num_layers: int | None) -> None:
    ours, _ = _pair()
    for param in ours.parameters():
        param.requires_grad_(False)
    trainable = [ours.model.layers[0].self_attn.q_proj.weight, ours.model.layers[1].mlp.down_proj.weight]
    for param in trainable:
        param.requires_grad_(True)
    embeds = ours.model.embed_tokens(torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5)))
    assert not embeds.requires_grad  # frozen embeddings: the layer inputs need no grad

    saved_plain, loss = _saved_tensor_count(ours, embeds)
    plain_grads = torch.autograd.grad(loss, trainable)
    ours.set_gradient_checkpointing(True, num_layers=num_layers)
    saved_ckpt, loss_ckpt = _saved_tensor_count(ours, embeds)
    ckpt_grads = torch.autograd.grad(loss_ckpt, trainable)

    assert saved_ckpt < saved_plain
    torch.testing.assert_close(loss_ckpt, loss)
    for got, expected in zip(ckpt_grads, plain_grads, strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, expected)


def test_checkpointing_layer_count_is_validated() -> None:
    ours, _ = _pair()
    with pytest.raises(ValueError, match="between 0 and 2"):
        ours.set_gradient_checkpointing(True, num_layers=3)
    ours.set_gradient_checkpointing(False)
    assert ours.checkpointed_layers == 0


def test_decoder_layer_compiles_without_graph_breaks() -> None:
    ours, _ = _pair()
    layer = ours.model.layers[0]
    hidden = torch.randn(2, 5, 64)
    cos, sin = rotary_cos_sin(torch.arange(5).expand(2, 5), 16, 1e6, hidden.dtype)
    layout = padded_layout(torch.ones(2, 5), causal=True)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(hidden, cos, sin, layout), layer(hidden, cos, sin, layout))
