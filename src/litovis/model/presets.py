"""Named Ovis2.5 configurations: the released 9B and 2B, and a tiny one for CPU tests.

`preset("9b").to_dict()` reproduces the official 9B `config.json`; `"tiny"` has exactly the
structure of the committed tiny reference checkpoint (tests/assets/ovis_tiny_reference).
"""

from __future__ import annotations

from collections.abc import Callable

from litovis.model.config import LLMConfig, OvisConfig, ViTConfig

_QWEN3_FIXED = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rope_scaling": None,
    "sliding_window": None,
    "torch_dtype": "float32",
    "use_cache": True,
    "use_sliding_window": False,
}

_NAVIT_FIXED = {
    "attention_dropout": 0.0,
    "fullatt_block_indexes": None,
    "hidden_act": "gelu_pytorch_tanh",
    "num_patches": -1,
    "preserve_original_pe": True,
    "temporal_patch_size": 1,
    "torch_dtype": "float32",
    "use_rope": True,
}


def _siglip2_so400m() -> ViTConfig:
    """The SigLIP2-so400m NaViT tower shared by the 2B and the 9B."""
    return ViTConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_channels=3,
        image_size=512,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_stride=2,
        window_size=112,
        extra={"_name_or_path": "google/siglip2-so400m-patch16-512", **_NAVIT_FIXED},
    )


def _qwen3_llm(name: str, hidden: int, layers: int, heads: int, mlp: int, tied: bool) -> LLMConfig:
    return LLMConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=151643,
        eos_token_id=151645,
        extra={"_name_or_path": name, "max_window_layers": layers, **_QWEN3_FIXED},
    )


def _top_level_extra(llm: LLMConfig) -> dict:
    return {
        "auto_map": {
            "AutoConfig": "configuration_ovis2_5.Ovis2_5_Config",
            "AutoModelForCausalLM": "modeling_ovis2_5.Ovis2_5",
        },
        "num_attention_heads": llm.num_attention_heads,
        "max_position_embeddings": llm.max_position_embeddings,
        "transformers_version": "4.51.3",
        "use_cache": True,
    }


def ovis2_5_9b() -> OvisConfig:
    """Ovis2.5-9B: Qwen3-8B (untied `lm_head`) + SigLIP2-so400m NaViT."""
    llm = _qwen3_llm("Qwen/Qwen3-8B", hidden=4096, layers=36, heads=32, mlp=12288, tied=False)
    return OvisConfig(llm=llm, vit=_siglip2_so400m(), visual_vocab_size=65536, extra=_top_level_extra(llm))


def ovis2_5_2b() -> OvisConfig:
    """Ovis2.5-2B: Qwen3-1.7B (tied embeddings, no `lm_head` tensor) + SigLIP2-so400m NaViT."""
    llm = _qwen3_llm("Qwen/Qwen3-1.7B", hidden=2048, layers=28, heads=16, mlp=6144, tied=True)
    return OvisConfig(llm=llm, vit=_siglip2_so400m(), visual_vocab_size=65536, extra=_top_level_extra(llm))


def ovis2_5_tiny() -> OvisConfig:
    """A tiny random-weight model with the structure of tests/assets/ovis_tiny_reference."""
    llm = LLMConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        extra={"attention_bias": False, "hidden_act": "silu", "architectures": ["Qwen3ForCausalLM"],
               "use_sliding_window": False, "sliding_window": None},
    )
    vit = ViTConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=64,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_stride=2,
        window_size=112,
        extra={"hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0, "num_patches": -1,
               "fullatt_block_indexes": None, "temporal_patch_size": 1, "preserve_original_pe": True,
               "use_rope": True},
    )
    return OvisConfig(llm=llm, vit=vit, visual_vocab_size=260, torch_dtype="float32")


PRESETS: dict[str, Callable[[], OvisConfig]] = {
    "9b": ovis2_5_9b,
    "2b": ovis2_5_2b,
    "tiny": ovis2_5_tiny,
}


def preset(name: str) -> OvisConfig:
    """A fresh `OvisConfig` for a known preset name (`"9b"`, `"2b"`, `"tiny"`)."""
    try:
        factory = PRESETS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown Ovis2.5 preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
    return factory()
