"""Tests for litovis.processing.tiny_tokenizer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from litovis.processing.tiny_tokenizer import build_tiny_tokenizer

TEXT = (
    "<|im_start|>user\nWhat is 42 + 7? Café, 日本 🙂<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nIt's 49.<|im_end|>"
)


def test_vocab_has_exactly_the_requested_size(tiny_tokenizer):
    assert len(tiny_tokenizer) == 512
    assert max(tiny_tokenizer.get_vocab().values()) == 511
    assert sorted(tiny_tokenizer.get_vocab().values()) == list(range(512))
    smaller = build_tiny_tokenizer(300)
    assert len(smaller) == 300


def test_chat_tokens_are_single_ids_at_the_end(tiny_tokenizer):
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert tiny_tokenizer.convert_tokens_to_ids(names) == [507, 508, 509, 510, 511]
    assert tiny_tokenizer.pad_token == "<|endoftext|>" and tiny_tokenizer.pad_token_id == 507
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.eos_token_id == 509
    ids = tiny_tokenizer("<|im_start|>user<think>x</think><|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == 508 and ids[-1] == 509 and 510 in ids and 511 in ids


def test_byte_level_round_trip_covers_any_text(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    assert all(0 <= i < 512 for i in ids)
    assert tiny_tokenizer.decode(ids) == TEXT


def test_think_tags_survive_skip_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("<|im_start|><think>a</think><|im_end|>", add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think>"


def test_two_builds_are_identical(tiny_tokenizer):
    again = build_tiny_tokenizer()
    first = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    second = json.loads(again.backend_tokenizer.to_str())
    assert first == second
    assert again(TEXT).input_ids == tiny_tokenizer(TEXT).input_ids


def test_save_and_load_round_trip_offline(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 512
    original = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    assert loaded(TEXT, add_special_tokens=False).input_ids == original
    assert (loaded.pad_token_id, loaded.eos_token_id) == (507, 509)


def test_impossible_sizes_raise():
    with pytest.raises(ValueError, match="at least 261"):
        build_tiny_tokenizer(200)
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        build_tiny_tokenizer(20000)
