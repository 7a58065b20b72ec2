"""`Predictor` and its helpers: generation ids from the tokenizer, readable prompts, stable row keys,
and records with cleaned answers from the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from litovis.data.batching import EncodedSample
from litovis.inference.postprocess import clean_answer
from litovis.inference.predictor import Predictor, generation_config, prompt_text, row_key
from litovis.model.checkpoint import build_ovis
from litovis.model.fp8_prefill import Fp8PrefillLinear
from litovis.model.presets import preset
from litovis.model.split_kv_decoding import split_kv_available
from litovis.model.tokens import IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID
from litovis.processing.chat import render_chat
from litovis.processing.processor import OvisProcessor
from litovis.processing.tiny_tokenizer import build_tiny_tokenizer
from litovis.training.config import PredictConfig

# The tiny tokenizer's last five ids (its documented layout, vocab 512).
END_OF_TEXT, IM_START, IM_END, THINK_START, THINK_END = range(507, 512)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def test_generation_config_takes_its_ids_from_the_tokenizer(tokenizer) -> None:
    settings = PredictConfig(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=3, top_p=0.8, seed=9)
    config = generation_config(settings, tokenizer)
    assert config.eos_token_ids == (IM_END, END_OF_TEXT)
    assert config.pad_token_id == END_OF_TEXT
    assert config.thinking_end_id == THINK_END
    assert config.assistant_header_ids[0] == IM_START
    assert tokenizer.decode(config.assistant_header_ids[1:]) == "assistant"
    assert (config.max_new_tokens, config.do_sample, config.temperature, config.top_k, config.top_p, config.seed) == (
        7, True, 0.7, 3, 0.8, 9)


def test_budget_suffix_ids_only_with_a_budget(tokenizer) -> None:
    assert generation_config(PredictConfig(), tokenizer).budget_suffix_ids == ()
    settings = PredictConfig(thinking_budget=16)
    config = generation_config(settings, tokenizer)
    assert config.thinking_budget == 16
    assert tokenizer.decode(config.budget_suffix_ids) == settings.thinking_suffix
    assert config.budget_suffix_ids[-3] == THINK_END


def test_a_tokenizer_without_the_chat_tokens_is_refused() -> None:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1, "</think>": 2, "a": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"no '<\|im_end\|>' token"):
        generation_config(PredictConfig(), plain)


def test_prompt_text_shows_each_visual_span_as_one_image_marker(tokenizer) -> None:
    span = [IMAGE_START_ID, *[VISUAL_ATOM_ID] * 4, IMAGE_END_ID]
    ids = [*tokenizer.encode("Look at "), *span, *tokenizer.encode(" and "), *span, *tokenizer.encode(". Which?")]
    assert prompt_text(torch.tensor(ids), tokenizer) == "Look at <image> and <image>. Which?"
    assert prompt_text(torch.tensor(tokenizer.encode("text only")), tokenizer) == "text only"


def test_row_keys_are_stable_across_processes_and_independent_of_order() -> None:
    ids = ["a", "b", "row-17", "测试", ""]
    keys = [row_key(i) for i in ids]
    assert len(set(keys)) == len(keys)
    assert all(0 <= k < 2**31 for k in keys)
    assert [row_key(i) for i in reversed(ids)] == keys[::-1]
    code = f"from litovis.inference.predictor import row_key; print([row_key(i) for i in {ids!r}])"
    # A key built on hash() would differ in an interpreter with another hash seed.
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(keys)


def _encoded(processor: OvisProcessor, sample_id: str, messages: list[dict], images: list, thinking: bool) -> EncodedSample:
    processed = processor(messages, images, add_generation_prompt=True, enable_thinking=thinking)
    return EncodedSample(sample_id, "vqa", processed.input_ids, processed.labels, processed.pixel_values,
                         processed.grid_thws)


def test_predictor_returns_records_with_cleaned_answers(tokenizer) -> None:
    torch.manual_seed(0)
    model = build_ovis(preset("tiny")).eval()
    processor = OvisProcessor(tokenizer, min_pixels=32 * 32, max_pixels=64 * 64)
    with_image = [{"role": "user", "content": "<image>\nWhat is shown?"}]
    text_only = [{"role": "user", "content": "Name the main idea."}]
    batch = [
        _encoded(processor, "thinks", with_image, [Image.new("RGB", (64, 48), "red")], thinking=True),
        _encoded(processor, "answers", text_only, [], thinking=False),
    ]
    settings = PredictConfig(max_new_tokens=80, thinking_budget=3, cuda_graphs=False)
    records = Predictor(model, tokenizer, settings)(batch)

    assert [r["id"] for r in records] == ["thinks", "answers"]
    assert all(list(r) == ["id", "task", "prompt", "raw", "answer"] and r["task"] == "vqa" for r in records)
    assert records[0]["prompt"] == render_chat(with_image, add_generation_prompt=True, enable_thinking=True)
    assert records[1]["prompt"] == render_chat(text_only, add_generation_prompt=True)
    for record in records:
        assert record["answer"] == clean_answer(record["raw"], "vqa", settings.postprocess)
    # The thinking row is cut by the budget suffix and answers after it; the non-thinking row's
    # answer is never cut.
    assert settings.thinking_suffix in records[0]["raw"]
    assert "</think>" not in records[0]["answer"]
    assert settings.thinking_suffix.strip() not in records[1]["raw"]
    free = Predictor(model, tokenizer, replace(settings, thinking_budget=None))(batch)
    assert free[1] == records[1]


def test_fp8_prefill_wraps_the_projections_of_the_merged_model(tokenizer) -> None:
    model = build_ovis(preset("tiny")).eval()
    Predictor(model, tokenizer, PredictConfig(fp8_prefill=True, cuda_graphs=False))
    wrapped = [name for name, module in model.named_modules() if isinstance(module, Fp8PrefillLinear)]
    assert len(wrapped) == 26 and all(".layers." in name for name in wrapped)
    plain = build_ovis(preset("tiny")).eval()
    Predictor(plain, tokenizer, PredictConfig(cuda_graphs=False))
    assert not any(isinstance(module, Fp8PrefillLinear) for module in plain.modules())


def test_decode_attention_resolves_per_device_and_a_float8_cache_needs_split_kv(tokenizer) -> None:
    model = build_ovis(preset("tiny")).eval()
    kernel = split_kv_available(torch.device("cpu"))  # only under Triton's interpreter
    default = Predictor(model, tokenizer, PredictConfig(cuda_graphs=False))  # auto
    assert default.generator.options.decode_attention == ("split_kv" if kernel else "sdpa")
    sdpa = Predictor(model, tokenizer, PredictConfig(cuda_graphs=False, decode_attention="sdpa"))
    assert sdpa.generator.options.decode_attention == "sdpa"
    matmul = Predictor(model, tokenizer, PredictConfig(cuda_graphs=False, decode_attention="matmul"))
    assert matmul.generator.options.decode_attention == "matmul"
    with pytest.raises(ValueError, match="fp8_kv_cache"):
        Predictor(model, tokenizer, PredictConfig(cuda_graphs=False, decode_attention="sdpa", fp8_kv_cache=True))
    with pytest.raises(ValueError, match="decode_attention must be"):
        Predictor(model, tokenizer, PredictConfig(decode_attention="flash"))
    if not kernel:
        with pytest.raises(RuntimeError, match="needs Triton and a CUDA device"):
            Predictor(model, tokenizer, PredictConfig(decode_attention="split_kv"))
