"""Parsing and writing the official Ovis2.5 config.json, and refusing settings that change the math."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from litovis.model.config import LLMConfig, OvisConfig, UnsupportedConfigError, ViTConfig

ASSETS = Path(__file__).parents[1] / "assets"
CONFIG_9B = ASSETS / "ovis2_5_9b_config.json"
CONFIG_TINY = ASSETS / "ovis_tiny_reference" / "config.json"


def _is_subset(original: dict, written: dict, path: str = "") -> list[str]:
    """Keys of `original` whose value `written` lost or changed (recursing into objects)."""
    problems = []
    for key, value in original.items():
        if key not in written:
            problems.append(f"{path}{key} missing")
        elif isinstance(value, dict) and isinstance(written[key], dict):
            problems += _is_subset(value, written[key], f"{path}{key}.")
        elif written[key] != value:
            problems.append(f"{path}{key}: {value!r} -> {written[key]!r}")
    return problems


def test_9b_config_parses_with_the_documented_values() -> None:
    config = OvisConfig.from_file(CONFIG_9B)
    assert (config.hidden_size, config.vocab_size, config.visual_vocab_size) == (4096, 151936, 65536)
    llm = config.llm
    assert (llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim) == (36, 32, 8, 128)
    assert (llm.intermediate_size, llm.rope_theta, llm.rms_norm_eps, llm.tie_word_embeddings) == (12288, 1e6, 1e-6, False)
    vit = config.vit
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.head_dim) == (1152, 27, 16, 72)
    assert (vit.intermediate_size, vit.patch_size, vit.position_grid, vit.hidden_stride) == (4304, 16, 32, 2)
    assert config.visual_head_size == 65532


def test_9b_round_trip_keeps_every_key_and_value() -> None:
    original = json.loads(CONFIG_9B.read_text())
    config = OvisConfig.from_dict(original)
    written = config.to_dict()
    assert _is_subset(original, written) == []
    assert OvisConfig.from_dict(written) == config


def test_tiny_round_trip_is_exact(tmp_path: Path) -> None:
    original = json.loads(CONFIG_TINY.read_text())
    config = OvisConfig.from_dict(original)
    assert config.to_dict() == original
    config.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == original
    assert OvisConfig.from_file(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    ("block", "key", "value", "message"),
    [
        ("llm_config", "rope_scaling", {"type": "yarn", "factor": 4.0}, "rope_scaling"),
        ("llm_config", "use_sliding_window", True, "use_sliding_window"),
        ("llm_config", "hidden_act", "gelu", "hidden_act"),
        ("llm_config", "attention_bias", True, "attention_bias"),
        ("llm_config", "model_type", "llama", "model_type"),
        ("vit_config", "fullatt_block_indexes", "3|7|11", "fullatt_block_indexes"),
        ("vit_config", "temporal_patch_size", 2, "temporal_patch_size"),
        ("vit_config", "num_patches", 256, "num_patches"),
        ("vit_config", "use_rope", False, "use_rope"),
        ("vit_config", "hidden_act", "gelu", "hidden_act"),
        (None, "hidden_size", 1234, "hidden_size"),
        (None, "model_type", "ovis", "model_type"),
    ],
)
def test_settings_that_change_the_math_raise(block: str | None, key: str, value, message: str) -> None:
    raw = copy.deepcopy(json.loads(CONFIG_9B.read_text()))
    (raw if block is None else raw[block])[key] = value
    with pytest.raises(UnsupportedConfigError, match=message):
        OvisConfig.from_dict(raw)


def test_missing_required_key_names_block_and_key() -> None:
    raw = json.loads(CONFIG_TINY.read_text())
    del raw["llm_config"]["num_hidden_layers"]
    with pytest.raises(KeyError, match="llm_config.*num_hidden_layers"):
        OvisConfig.from_dict(raw)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        OvisConfig.from_file(bad)


def test_defaults_follow_transformers_qwen3() -> None:
    raw = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
           "vocab_size": 10}
    llm = LLMConfig.from_dict(raw)
    assert llm.num_key_value_heads == 4 and llm.head_dim == 16 and not llm.tie_word_embeddings


def test_vit_head_dim_must_allow_2d_rotary() -> None:
    raw = {"hidden_size": 60, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 6}
    with pytest.raises(UnsupportedConfigError, match="multiple of 4"):
        ViTConfig.from_dict(raw)


def test_transformers5_rope_parameters_are_read_and_checked() -> None:
    raw = json.loads(CONFIG_TINY.read_text())
    raw["llm_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    raw["llm_config"].pop("rope_theta")
    raw["llm_config"]["layer_types"] = ["full_attention", "full_attention"]
    config = OvisConfig.from_dict(raw)
    assert config.llm.rope_theta == 5000.0
    assert config.to_dict() == raw
    raw["llm_config"]["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(UnsupportedConfigError, match="rope_type 'yarn'"):
        OvisConfig.from_dict(raw)
    raw["llm_config"]["rope_parameters"]["rope_type"] = "default"
    raw["llm_config"]["layer_types"] = ["full_attention", "sliding_attention"]
    with pytest.raises(UnsupportedConfigError, match="sliding_attention"):
        OvisConfig.from_dict(raw)
