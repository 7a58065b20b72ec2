"""The Ovis2.5 model: Qwen3 LLM + visual tokenizer (SigLIP2-NaViT + head) + visual embedding table.

`forward` merges text and images into one embedding sequence and runs the LLM over a padded
batch (`attention_mask`) or a packed row (`position_ids`, `cu_seqlens`, `max_seqlen`; see
`litovis.data.batching.PackedBatch`):

- text ids are embedded by the LLM's table (placeholder ids, all negative, read row 0);
- indicator ids -301..-304 take VTE rows `visual_vocab_size - 4 .. - 1`;
- the -300 positions, in (row, position) order, take `visual_probs @ vte.weight`, one row per
  visual atom of `pixel_values` (the images in the order of their spans).

The merge is out of place (`masked_scatter` returns new tensors), so no leaf output is written
in place. FLOP counts for MFU live in `litovis.model.flops`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from litovis.model.attention import check_backend_name
from litovis.model.config import OvisConfig
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
    head_loss: Any = None
    """What `forward`'s `head_loss` callable returned (only when one was given)."""


class Ovis2_5(nn.Module):
    """Native Ovis2.5 whose state dict matches the official checkpoint key for key."""

    def __init__(self, config: OvisConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(attention_backend)
        self.config = config
        self.llm = Qwen3ForCausalLM(config.llm, attention_backend)
        self.visual_tokenizer = VisualTokenizer(config.vit, config.visual_vocab_size, attention_backend)
        self.vte = nn.Embedding(config.visual_vocab_size, config.hidden_size)
        self.touch_vision_without_images: bool | str = False
        """Run a tiny dummy image through the vision parameters, with zero contribution, when a
        batch has no images. False: never. True: when grad is enabled, so every trainable
        parameter takes part in backward (DDP). `"always"`: also without grad, because under
        FSDP every rank must run the same sharded modules (their all-gathers are collective)."""

    def set_attention_backend(self, backend: str) -> None:
        """Use `"auto"`, `"sdpa"` or `"varlen"` for both the LLM and the ViT."""
        check_backend_name(backend)
        self.llm.attention_backend = backend
        self.visual_tokenizer.vit.vision_model.attention_backend = backend

    def compile_layers(self, **options: Any) -> None:
        """`torch.compile` every LLM decoder layer and ViT encoder layer in place (`options` go to
        `compile`). Layers of one stack share their graphs; the ViT's attention stays eager, so
        images of new sizes do not recompile it (`VisionEncoderLayer.compile`)."""
        for layer in (*self.llm.model.layers, *self.visual_tokenizer.vit.vision_model.encoder.layers):
            layer.compile(**options)

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
            touch = self.touch_vision_without_images
            if touch == "always" or (touch is True and torch.is_grad_enabled()):
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
        head_loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> OvisOutput:
        """Run the model on one batch (padded: `attention_mask`; packed: `cu_seqlens`, B == 1).

        `labels` are unshifted (`labels[t]` is the token at t, or -100); the loss shifts them.
        `head_loss(hidden_states, output_weight)`, when given, is computed here and returned as
        `head_loss` (with the hidden states): inside `forward`, because a sharded (FSDP) model's
        output weight is whole only while its forward runs.
        """
        embeds = self.merge_multimodal(input_ids, pixel_values, grid_thws)
        hidden = self.llm(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if head_loss is not None:
            return OvisOutput(hidden_states=hidden, head_loss=head_loss(hidden, self.llm.output_weight))
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
