"""Fixtures for the processing tests: the tiny tokenizer, built once per session."""

import pytest

from litovis.processing.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The deterministic 512-id byte-level BPE tokenizer with the Qwen chat tokens."""
    return build_tiny_tokenizer()
