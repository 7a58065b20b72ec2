"""`Predictor`: a batch of encoded prompts → prediction records (`id, task, prompt, raw, answer`).

It owns the fast generator (packed prefill, CUDA-graph decode, reused across batches of the same
shape) and the tokenizer-dependent ids (eos, pad, `</think>`, the assistant header, the
thinking-budget suffix), so the LightningModule's `predict_step` is one call. Sampling draws are
keyed by a hash of the sample id: a row's answer does not depend on which batch or rank it landed
in, nor on a rerun's skips.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from litovis.data.batching import EncodedSample
from litovis.data.sample import IMAGE_MARKER
from litovis.inference.postprocess import clean_answer
from litovis.model.decode_step import resolve_decode_attention
from litovis.model.decoding import DecodeOptions, FastGenerator
from litovis.model.fp8_prefill import enable_fp8_prefill
from litovis.model.generation import GenerationConfig
from litovis.model.tokens import IMAGE_END_ID, IMAGE_START_ID
from litovis.processing.chat import ASSISTANT_HEADER, END_OF_TEXT, IM_END, THINK_END
from litovis.training.config import PredictConfig


def generation_config(settings: PredictConfig, tokenizer: Any) -> GenerationConfig:
    """The model-level generation config: user settings + ids from the tokenizer."""

    def token_id(token: str) -> int:
        value = tokenizer.convert_tokens_to_ids(token)
        if value is None or value == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token!r} token (needed for generation)")
        return int(value)

    end_of_turn, end_of_text = token_id(IM_END), token_id(END_OF_TEXT)
    suffix: tuple[int, ...] = ()
    if settings.thinking_budget is not None:
        suffix = tuple(tokenizer.encode(settings.thinking_suffix, add_special_tokens=False))
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        repetition_penalty=settings.repetition_penalty,
        eos_token_ids=(end_of_turn, end_of_text),
        pad_token_id=end_of_text,
        seed=settings.seed,
        thinking_budget=settings.thinking_budget,
        thinking_end_id=token_id(THINK_END),
        budget_suffix_ids=suffix,
        assistant_header_ids=tuple(tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)),
    )
    config.validate()
    return config


def prompt_text(input_ids: torch.Tensor, tokenizer: Any) -> str:
    """The prompt as text, each visual span shown as one `<image>`."""
    pieces: list[str] = []
    text: list[int] = []
    for token in input_ids.tolist():
        if token >= 0:
            text.append(token)
        elif token == IMAGE_START_ID:
            pieces.append(tokenizer.decode(text))
            text = []
        elif token == IMAGE_END_ID:
            pieces.append(IMAGE_MARKER)
    pieces.append(tokenizer.decode(text))
    return "".join(pieces)


def row_key(sample_id: str) -> int:
    """Stable sampling key of a sample (independent of batch, rank and rerun)."""
    return zlib.crc32(sample_id.encode("utf-8")) & 0x7FFFFFFF


class Predictor:
    """Generates answers for batches of encoded prompts with one model (adapters merged: with
    `fp8_prefill` its projections are wrapped in place)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: PredictConfig) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        if settings.fp8_prefill:
            enable_fp8_prefill(model)
        device = next(model.parameters()).device
        options = DecodeOptions(cuda_graphs=settings.cuda_graphs, fp8_kv_cache=settings.fp8_kv_cache,
                                decode_attention=resolve_decode_attention(settings.decode_attention, device))
        self.generator = FastGenerator(model, generation_config(settings, tokenizer), options)

    @torch.inference_mode()
    def __call__(self, batch: Sequence[EncodedSample]) -> list[dict[str, str]]:
        outputs = self.generator.generate(list(batch), row_keys=[row_key(s.id) for s in batch])
        records = []
        for sample, tokens in zip(batch, outputs, strict=True):
            raw = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
            records.append(
                {
                    "id": sample.id,
                    "task": sample.task,
                    "prompt": prompt_text(sample.input_ids, self.tokenizer),
                    "raw": raw,
                    "answer": clean_answer(raw, sample.task, self.settings.postprocess),
                }
            )
        return records
