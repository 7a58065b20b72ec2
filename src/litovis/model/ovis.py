"""The Ovis2.5 model: Qwen3 LLM + visual tokenizer (SigLIP2-NaViT + head) + visual embedding table.

`forward` merges text and images into one embedding sequence and runs the LLM over a padded
batch or a packed row (see the batch contract in BRIEF/DESIGN):

- text ids are embedded by the LLM's table (placeholder ids, all negative, read row 0);
- indicator ids -301..-304 take VTE rows `visual_vocab_size - 4 .. - 1`;
- the -300 positions, in (row, position) order, take `visual_probs @ vte.weight`, one row per
  visual atom of `pixel_values` (the images in the order of their spans).

The merge is out of place (`masked_scatter` returns new tensors), so no leaf output is written
in place. FLOP counts for MFU are plain functions of the config at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from litovis.model.attention import check_backend_name
from litovis.model.config import LLMConfig, OvisConfig, ViTConfig
from litovis.model.generation import GenerationConfig, generate
from litovis.model.qwen3 import Qwen3ForCausalLM
from litovis.model.tokens import (
    IGNORE_INDEX,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    INDICATOR_IDS,
    VIDEO_END_ID,
    VIDEO_TOKEN_ID,
    VISUAL_ATOM_ID,
)
from litovis.model.vision import VisualTokenizer


@dataclass
class OvisOutput:
    """Result of `Ovis2_5.forward`: logits or hidden states, and the loss when labels were given."""

    logits: torch.Tensor | None = None
    """`[B, T, vocab]` (absent when `return_hidden`)."""
    hidden_states: torch.Tensor | None = None
    """`[B, T, hidden]` final-normed LLM states (only when `return_hidden`)."""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy over labelled positions (only when `labels` were given)."""


class Ovis2_5(nn.Module):
    """Native Ovis2.5 whose state dict matches the official checkpoint key for key."""

    def __init__(self, config: OvisConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(attention_backend)
        self.config = config
        self.llm = Qwen3ForCausalLM(config.llm, attention_backend)
        self.visual_tokenizer = VisualTokenizer(config.vit, config.visual_vocab_size, attention_backend)
        self.vte = nn.Embedding(config.visual_vocab_size, config.hidden_size)
        self.touch_vision_without_images = False
        """When True, a batch without images still runs a tiny dummy image through the vision
        parameters with zero contribution, so every parameter takes part in backward (DDP)."""

    def set_attention_backend(self, backend: str) -> None:
        """Use `"auto"`, `"sdpa"` or `"varlen"` for both the LLM and the ViT."""
        check_backend_name(backend)
        self.llm.attention_backend = backend
        self.visual_tokenizer.vit.vision_model.attention_backend = backend

    def visual_tokens(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        """Probabilistic visual tokens `[atoms, visual_vocab_size]` of the given images."""
        return self.visual_tokenizer(pixel_values, grid_thws)

    def merge_multimodal(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        grid_thws: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings `[B, T, hidden]` for ids with expanded visual spans."""
        _check_placeholders(input_ids)
        embeds = self.llm.model.embed_tokens(input_ids.clamp(min=0))
        if (pixel_values is None) != (grid_thws is None):
            raise ValueError("pixel_values and grid_thws go together")
        vte = self.vte.weight
        indicator_first = self.config.visual_vocab_size - len(INDICATOR_IDS)
        is_indicator = (input_ids <= IMAGE_START_ID) & (input_ids >= VIDEO_END_ID)
        indicator_offsets = IMAGE_START_ID - input_ids[is_indicator]
        if indicator_offsets.numel():
            indicator_rows = vte[indicator_first + indicator_offsets].to(embeds.dtype)
            embeds = embeds.masked_scatter(is_indicator[..., None], indicator_rows)

        is_atom = input_ids == VISUAL_ATOM_ID
        atoms = int(is_atom.sum())
        if pixel_values is None:
            if atoms:
                raise ValueError(f"input_ids hold {atoms} visual atom positions (-300) but no pixel_values were given")
            if self.touch_vision_without_images and torch.is_grad_enabled():
                embeds = embeds + self._zero_vision_term(embeds)
            return embeds
        tokens = self.visual_tokens(pixel_values, grid_thws)
        if tokens.shape[0] != atoms:
            raise ValueError(f"input_ids hold {atoms} visual atom positions (-300) but the images give "
                             f"{tokens.shape[0]} visual atoms (grid_thws {grid_thws.tolist()})")
        visual_embeds = (tokens @ vte.to(tokens.dtype)).to(embeds.dtype)
        return embeds.masked_scatter(is_atom[..., None], visual_embeds)

    def _zero_vision_term(self, like: torch.Tensor) -> torch.Tensor:
        """0 * (a dummy image's visual embeddings + the indicator rows): touches every vision parameter."""
        vit_dtype = self.visual_tokenizer.head[0].weight.dtype
        pixels, grid = self.visual_tokenizer.dummy_inputs(like.device, vit_dtype)
        dummy = self.visual_tokens(pixels, grid) @ self.vte.weight.to(vit_dtype)
        return (dummy.sum() + self.vte.weight[-len(INDICATOR_IDS):].sum()).to(like.dtype) * 0.0

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        grid_thws: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> OvisOutput:
        """Run the model on one batch (padded: `attention_mask`; packed: `cu_seqlens`, B == 1).

        `labels` are unshifted (`labels[t]` is the token at t, or -100); the loss shifts them.
        """
        embeds = self.merge_multimodal(input_ids, pixel_values, grid_thws)
        hidden = self.llm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if return_hidden:
            loss = None if labels is None else shifted_cross_entropy(self.llm.logits(hidden), labels)
            return OvisOutput(hidden_states=hidden, loss=loss)
        logits = self.llm.logits(hidden)
        loss = None if labels is None else shifted_cross_entropy(logits, labels)
        return OvisOutput(logits=logits, loss=loss)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_thws: torch.Tensor | None = None,
        config: GenerationConfig | None = None,
        **overrides,
    ) -> torch.Tensor:
        """New token ids `[B, n]` for left-padded prompts; see `litovis.model.generation.generate`.

        `overrides` are `GenerationConfig` fields applied on top of `config` (or the defaults).
        """
        if config is None:
            config = GenerationConfig(**overrides)
        elif overrides:
            config = replace(config, **overrides)
        return generate(self, input_ids, attention_mask, pixel_values, grid_thws, config)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: `llm`, `vit`, `head` (visual head), `vte` and `total` (tied counted once)."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        parts = {
            "llm": count(self.llm),
            "vit": count(self.visual_tokenizer.vit),
            "head": count(self.visual_tokenizer.head),
            "vte": count(self.vte),
        }
        parts["total"] = count(self)
        return parts

    def flops_per_token(self, context_len: float) -> float:
        """LLM forward FLOPs per token for a sample of `context_len` tokens (see `llm_forward_flops_per_token`)."""
        return llm_forward_flops_per_token(self.config.llm, context_len)


def _check_placeholders(input_ids: torch.Tensor) -> None:
    """Reject unexpanded image/video placeholders and unknown negative ids."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    negative = input_ids[input_ids < 0]
    if negative.numel() == 0:
        return
    for placeholder in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID):
        if bool((negative == placeholder).any()):
            raise ValueError(f"input_ids hold an unexpanded placeholder {placeholder}; expand each into "
                             "[start, -300 x atoms, end] before the model")
    allowed = torch.tensor((VISUAL_ATOM_ID, *INDICATOR_IDS), device=input_ids.device)
    unknown = negative[~torch.isin(negative, allowed)]
    if unknown.numel():
        raise ValueError(f"input_ids hold unknown negative ids {sorted(set(unknown.tolist()))}")


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits[:, t]` predicting `labels[:, t + 1]` (float32, -100 ignored)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def llm_matmul_params(config: LLMConfig) -> int:
    """Weights used in matmuls per token: every projection of every layer plus the output head."""
    attention = config.hidden_size * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + config.vocab_size * config.hidden_size


def llm_forward_flops_per_token(config: LLMConfig, context_len: float) -> float:
    """Forward FLOPs per token: 2 x matmul params + causal attention over a `context_len` sample.

    Causal attention averages `context_len / 2` keys per query; QK^T and AV cost 2 FLOPs per
    multiply-add each: `4 * layers * heads * head_dim * context_len / 2`.
    """
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * context_len
    return 2.0 * llm_matmul_params(config) + attention


def vit_forward_flops_per_patch(config: ViTConfig, frame_patches: float) -> float:
    """ViT forward FLOPs per patch when each frame has `frame_patches` patches (bidirectional)."""
    per_layer = 4 * config.hidden_size ** 2 + 2 * config.hidden_size * config.intermediate_size
    embed = config.num_channels * config.patch_size ** 2 * config.hidden_size
    attention = 4 * config.num_hidden_layers * config.hidden_size * frame_patches
    return 2.0 * (config.num_hidden_layers * per_layer + embed) + attention


def visual_head_forward_flops_per_atom(config: OvisConfig) -> float:
    """Visual head + VTE forward FLOPs per visual atom."""
    head = config.vit.hidden_size * config.vit.hidden_stride ** 2 * config.visual_head_size
    return 2.0 * (head + config.visual_vocab_size * config.hidden_size)
