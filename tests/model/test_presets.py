"""Presets: the 9B/2B/tiny configs and the exact parameter layout of the released checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from litovis.model.checkpoint import build_ovis
from litovis.model.config import OvisConfig
from litovis.model.presets import PRESETS, preset

ASSETS = Path(__file__).parents[1] / "assets"


def _tsv_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        shapes[name] = tuple(int(v) for v in shape.split("x"))
    return shapes


def test_9b_preset_equals_the_official_config() -> None:
    official = OvisConfig.from_file(ASSETS / "ovis2_5_9b_config.json")
    assert preset("9b") == official


def test_tiny_preset_equals_the_tiny_reference_config(tiny_reference_dir: Path) -> None:
    assert preset("tiny").to_dict() == json.loads((tiny_reference_dir / "config.json").read_text())


def test_2b_preset_is_qwen3_1_7b_with_tied_embeddings() -> None:
    llm = preset("2b").llm
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads) == (2048, 28, 16, 8)
    assert (llm.head_dim, llm.intermediate_size, llm.vocab_size, llm.tie_word_embeddings) == (128, 6144, 151936, True)
    assert preset("2b").vit == preset("9b").vit


def test_9b_on_meta_matches_the_released_tensor_list(weights_tsv_9b: Path) -> None:
    expected = _tsv_shapes(weights_tsv_9b)
    model = build_ovis(preset("9b"), dtype=torch.bfloat16, device="meta")
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert len(ours) == 840
    counts = model.num_parameters()
    assert counts["total"] == 9_174_807_784
    assert counts == {"llm": 8_190_735_360, "vit": 413_534_448, "head": 302_102_520, "vte": 268_435_456,
                      "total": 9_174_807_784}


def test_2b_on_meta_has_no_lm_head_and_the_released_size() -> None:
    model = build_ovis(preset("2b"), dtype=torch.bfloat16, device="meta")
    names = set(model.state_dict())
    assert "llm.lm_head.weight" not in names
    assert "llm.model.embed_tokens.weight" in names
    counts = model.num_parameters()
    assert counts["llm"] == 1_720_574_976
    assert counts["total"] == 2_570_429_672


def test_presets_are_fresh_objects() -> None:
    first = preset("tiny")
    first.llm.num_hidden_layers = 99
    assert preset("tiny").llm.num_hidden_layers == 2


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        preset("7b")
    for name in PRESETS:
        assert name in str(info.value)
