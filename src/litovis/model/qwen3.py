"""The Qwen3 decoder that Ovis2.5 uses as its LLM, written for packing, chunked loss and fast decoding.

Parameter names equal transformers' `Qwen3ForCausalLM` (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, ..., `model.norm`, `lm_head`), so the official checkpoint
loads key-for-key under `llm.` and PEFT can wrap the projections (plain `nn.Linear`) by name.
With tied embeddings there is no `lm_head` module at all: logits use `embed_tokens.weight`.

`forward` returns the final-normed hidden states; `logits(hidden)` applies the output
projection separately so a training loss can be computed in chunks without ever holding
`[T, vocab]` logits. Inputs are either a padded batch (`attention_mask`), a packed row
(`cu_seqlens`/`max_seqlen`, positions restarting per sample) or decoding steps against a
`StaticKVCache`. `run_layers` takes a ready attention layout and any `KVCache` (the fast
generator's packed prefill and decode step use it). Numerics follow transformers (RMSNorm in float32, rotary cos/sin cast to the
activation dtype) so logits match it. Layers contain no Python branching on tensor values.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from litovis.model.attention import AttentionLayout, attend, packed_layout, padded_layout, segment_ids
from litovis.model.config import LLMConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32 (as transformers does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, T, head_dim]` of 1D rotary positions, in the rotate-half layout.

    The inverse frequencies are computed here rather than stored in a buffer, so a model built
    on the meta device and loaded with `assign=True` has nothing left to initialise.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = position_ids[..., None].float() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x `[B, T, H, D]` by cos/sin `[B, T, D]`."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


class LayerKV(Protocol):
    """What a decoder layer needs from a cache: store its new keys/values, return the keys/values the
    queries attend to (`[B, Tk, kv_heads, head_dim]`, any strides) and their (key, value) scales
    when they are stored quantised (else None)."""

    def update(self, k: torch.Tensor, v: torch.Tensor,
               slots: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        ...


class KVCache(Protocol):
    """A cache over all layers: `layer(i)` is layer i's `LayerKV`.

    Layers get their own view, not the cache and an index: a compiled decoder layer would otherwise
    be specialised on the index and recompiled for every layer (past dynamo's cache limit).
    """

    def layer(self, index: int) -> LayerKV:
        ...


class StaticKVCache:
    """Preallocated keys/values per layer, `[B, max_len, kv_heads, head_dim]`, written at slots.

    Shapes never change during generation, so a decode step can be captured in a CUDA graph.
    """

    def __init__(self, config: LLMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    def layer(self, index: int) -> StaticLayerKV:
        return StaticLayerKV(self.keys[index], self.values[index])


class StaticLayerKV:
    """One layer's `StaticKVCache` buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Write k/v `[B, Tq, Hkv, D]` at cache slots `[Tq]`; return the whole cache of this layer."""
        self.keys.index_copy_(1, slots, k.to(self.keys.dtype))
        self.values.index_copy_(1, slots, v.to(self.values.dtype))
        return self.keys, self.values, None


class Qwen3Attention(nn.Module):
    """Multi-head attention with per-head RMSNorm on q and k, rotary positions and GQA."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        cache: LayerKV | None = None,
        cache_slots: Any = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, length, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kv_scales = None
        if cache is not None:
            k, v, kv_scales = cache.update(k, v, cache_slots)
        out = attend(q, k, v, layout, kv_scales=kv_scales)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        cache: LayerKV | None = None,
        cache_slots: Any = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, cache, cache_slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Embedding table, decoder layers and final norm (transformers' `Qwen3Model` names)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 language model returning final-normed hidden states; `logits` applies the head."""

    def __init__(self, config: LLMConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.checkpointed_layers = 0
        self.hooked_layers = 0
        self.saved_tensor_hooks: Callable[[], AbstractContextManager] = nullcontext
        self.model = Qwen3Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """`[vocab, hidden]` weight of the output projection (the embedding table when tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of (a chunk of) hidden states."""
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def set_gradient_checkpointing(self, enabled: bool = True, num_layers: int | None = None) -> None:
        """Recompute the first `num_layers` decoder layers (all when None) in backward.

        Non-reentrant `torch.utils.checkpoint`: it saves memory even when the layer inputs do not
        require grad (frozen embeddings, frozen vision tower), because it hooks the tensors saved
        by the parameters' own autograd graph rather than the layer's inputs.
        """
        total = self.config.num_hidden_layers
        count = (total if num_layers is None else num_layers) if enabled else 0
        if not 0 <= count <= total:
            raise ValueError(f"num_layers must be between 0 and {total}, got {num_layers}")
        self.checkpointed_layers = count

    def set_saved_tensor_hooks(self, hooks: Callable[[], AbstractContextManager], num_layers: int) -> None:
        """Run the first `num_layers` decoder layers inside `hooks()` whenever they build a graph for
        backward (e.g. `ActivationOffload.hooks`, which parks their saved activations on the host)."""
        total = self.config.num_hidden_layers
        if not 0 <= num_layers <= total:
            raise ValueError(f"num_layers must be between 0 and {total}, got {num_layers}")
        self.saved_tensor_hooks, self.hooked_layers = hooks, num_layers

    def _layout(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        cache_slots: torch.Tensor | None,
    ) -> AttentionLayout:
        batch, length, _ = hidden.shape
        if cu_seqlens is not None:
            if attention_mask is not None or cache_slots is not None:
                raise ValueError("packed inputs (cu_seqlens) take neither attention_mask nor a KV cache")
            if batch != 1:
                raise ValueError(f"packed inputs need batch size 1, got {batch}")
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            return packed_layout(cu_seqlens, max_seqlen, length, causal=True, backend=self.attention_backend,
                                 device=hidden.device, dtype=hidden.dtype)
        if attention_mask is None:
            if cache_slots is not None:
                raise ValueError("decoding with a KV cache needs the attention_mask over all cache slots")
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        return padded_layout(attention_mask, causal=True, query_slots=cache_slots)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: StaticKVCache | None = None,
        cache_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states `[B, T, hidden]`.

        Give `input_ids` or `inputs_embeds`. Padded batch: `attention_mask` `[B, T]` (positions
        default to the count of real tokens before each one). Packed row: `cu_seqlens` (and
        `max_seqlen`), positions default to restarting at each sample. Decoding: `cache`,
        `cache_slots` `[T]` (the cache slots the new tokens occupy), `attention_mask`
        `[B, cache.max_len]` marking valid slots, and explicit `position_ids`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if (cache is None) != (cache_slots is None):
            raise ValueError("cache and cache_slots go together")
        if cache is not None and position_ids is None:
            raise ValueError("decoding with a KV cache needs explicit position_ids")
        batch, length, _ = hidden.shape
        if cu_seqlens is not None and int(cu_seqlens[-1]) != length:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the packed row has {length} tokens")
        if position_ids is None:
            if cu_seqlens is not None:
                cu = cu_seqlens.to(hidden.device).long()
                positions = torch.arange(length, device=hidden.device)
                position_ids = (positions - cu[segment_ids(cu, length)])[None]
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(length, device=hidden.device).expand(batch, length)
        layout = self._layout(hidden, attention_mask, cu_seqlens, max_seqlen, cache_slots)
        return self.run_layers(hidden, position_ids, layout, cache, cache_slots)

    def run_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        layout: AttentionLayout,
        cache: KVCache | None = None,
        cache_slots: Any = None,
    ) -> torch.Tensor:
        """Decoder layers and final norm over input embeddings `[B, T, hidden]` with a ready layout.

        The lower half of `forward`, for callers that build their own layout and cache: anything
        with `layer(i).update(k, v, cache_slots) -> (keys, values, scales)` serves as `cache` (the
        keys and values it returns are what the queries attend to under `layout`).
        """
        cos, sin = rotary_cos_sin(position_ids.to(hidden.device), self.config.head_dim, self.config.rope_theta, hidden.dtype)
        training = torch.is_grad_enabled() and cache is None
        for index, layer in enumerate(self.model.layers):
            with self.saved_tensor_hooks() if training and index < self.hooked_layers else nullcontext():
                if training and index < self.checkpointed_layers:
                    hidden = checkpoint(layer, hidden, cos, sin, layout, use_reentrant=False)
                else:
                    hidden = layer(hidden, cos, sin, layout, None if cache is None else cache.layer(index), cache_slots)
        return self.model.norm(hidden)
