"""Ovis2.5 configuration: the LLM, the vision tower and the whole model, in the official format.

`OvisConfig.from_dict` reads the official `config.json` (`llm_config`, `vit_config`,
`visual_vocab_size`, ...) and `to_dict` writes it back; keys that do not change the computation
(`_name_or_path`, `use_cache`, `auto_map`, ...) are kept in `extra` so a round trip is lossless.
Values that would change the math but that litovis does not implement (rope scaling, sliding
windows, windowed ViT blocks, temporal patches, ...) raise `UnsupportedConfigError` instead of
being ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class UnsupportedConfigError(ValueError):
    """A config value that would change the model's computation in a way litovis does not support."""


def _take(raw: dict[str, Any], cls: type, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `raw` into the dataclass fields of `cls` and the remaining (pass-through) keys."""
    if not isinstance(raw, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: v for k, v in raw.items() if k in names}
    extra = {k: v for k, v in raw.items() if k not in names and k != "model_type"}
    return known, extra


def _fields_dict(config: Any) -> dict[str, Any]:
    """Typed fields of a config dataclass, leaving out unset optional ones."""
    return {f.name: getattr(config, f.name) for f in fields(config)
            if f.name != "extra" and getattr(config, f.name) is not None}


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise UnsupportedConfigError(f"{where}: {message}")


@dataclass
class LLMConfig:
    """Qwen3 decoder (the `llm_config` block); names follow transformers' `Qwen3Config`."""

    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads per layer."""
    num_key_value_heads: int
    """Key/value heads per layer (grouped-query attention when smaller than the query heads)."""
    head_dim: int
    """Width of one attention head (Qwen3 sets it explicitly; not hidden/heads)."""
    vocab_size: int
    """Number of text token embeddings and logits."""
    max_position_embeddings: int = 40960
    """Longest sequence the model was trained for (informational; RoPE is not truncated)."""
    rope_theta: float = 1_000_000.0
    """Base of the rotary frequencies."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (layers, q_norm/k_norm, final norm)."""
    tie_word_embeddings: bool = False
    """True when the output projection reuses `embed_tokens.weight` (2B): no `lm_head` tensor."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id, kept for the config file; the chat format does not use it."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence id(s) recorded in the config file."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the file (`_name_or_path`, `use_cache`, the validated `hidden_act`, ...),
    written back unchanged."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "llm_config") -> LLMConfig:
        """Parse the official `llm_config` block; raise on unsupported settings."""
        known, extra = _take(raw, cls, where)
        _require(raw.get("model_type", "qwen3") == "qwen3", where, f"model_type {raw.get('model_type')!r} is not 'qwen3'")
        _require(raw.get("rope_scaling") is None, where, f"rope_scaling {raw.get('rope_scaling')!r} is not supported (must be null)")
        _require(not raw.get("use_sliding_window", False), where, "use_sliding_window=true is not supported")
        _require(raw.get("hidden_act", "silu") == "silu", where, f"hidden_act {raw.get('hidden_act')!r} is not 'silu'")
        _require(not raw.get("attention_bias", False), where, "attention_bias=true is not supported")
        _require(float(raw.get("attention_dropout", 0.0)) == 0.0, where, "attention_dropout must be 0")
        layer_types = raw.get("layer_types") or []
        _require(all(kind == "full_attention" for kind in layer_types), where,
                 f"layer_types other than 'full_attention' are not supported: {sorted(set(layer_types))}")
        rope_parameters = raw.get("rope_parameters")  # transformers 5 writes rope_theta here
        if rope_parameters is not None:
            rope_type = rope_parameters.get("rope_type", "default")
            _require(rope_type == "default", where, f"rope_parameters.rope_type {rope_type!r} is not supported")
            theta = rope_parameters.get("rope_theta", known.get("rope_theta"))
            _require(known.get("rope_theta", theta) == theta, where, "rope_theta and rope_parameters.rope_theta differ")
            if theta is not None:
                known["rope_theta"] = theta
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in known:
                raise KeyError(f"{where}: missing required key {key!r}")
        known.setdefault("num_key_value_heads", known["num_attention_heads"])
        known.setdefault("head_dim", known["hidden_size"] // known["num_attention_heads"])
        _require(known["num_attention_heads"] % known["num_key_value_heads"] == 0, where,
                 "num_attention_heads must be a multiple of num_key_value_heads")
        known["rope_theta"] = float(known.get("rope_theta", cls.rope_theta))
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The official `llm_config` block."""
        out = {**_fields_dict(self), "model_type": "qwen3"}
        if float(self.rope_theta).is_integer():
            out["rope_theta"] = int(self.rope_theta)
        if "rope_parameters" in self.extra:
            out.pop("rope_theta")  # the file kept it inside rope_parameters
        return {**out, **self.extra}


@dataclass
class ViTConfig:
    """SigLIP2-NaViT vision tower (the `vit_config` block)."""

    hidden_size: int
    """Width of the ViT residual stream."""
    intermediate_size: int
    """Width of the ViT MLP."""
    num_hidden_layers: int
    """Number of encoder layers."""
    num_attention_heads: int
    """Attention heads per layer (head_dim = hidden_size / heads)."""
    num_channels: int = 3
    """Image channels (RGB)."""
    image_size: int = 512
    """Pre-training resolution: the position table is (image_size/patch_size)^2 entries."""
    patch_size: int = 16
    """Side of one square patch in pixels."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the ViT LayerNorms."""
    hidden_stride: int = 2
    """Side of the block of patches merged into one visual atom (2 -> 2x2 patches)."""
    window_size: int = 112
    """Window of the (unused) windowed-attention variant; no effect while every block is full attention."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the file (`_name_or_path`, the validated `hidden_act`, ...), written back unchanged."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "vit_config") -> ViTConfig:
        """Parse the official `vit_config` block; raise on unsupported settings."""
        known, extra = _take(raw, cls, where)
        checks = {
            "model_type": ("siglip2_navit", "is not 'siglip2_navit'"),
            "hidden_act": ("gelu_pytorch_tanh", "is not 'gelu_pytorch_tanh'"),
            "fullatt_block_indexes": (None, "windowed attention blocks are not supported (must be null)"),
            "temporal_patch_size": (1, "temporal patches are not supported (must be 1)"),
            "num_patches": (-1, "the linear (naflex) patch embedding is not supported (must be -1)"),
            "preserve_original_pe": (True, "must be true (the learned position table is always used)"),
            "use_rope": (True, "must be true (the 2D rotary embedding is always used)"),
        }
        for key, (expected, why) in checks.items():
            _require(raw.get(key, expected) == expected, where, f"{key}={raw.get(key)!r} {why}")
        _require(float(raw.get("attention_dropout", 0.0)) == 0.0, where, "attention_dropout must be 0")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in known:
                raise KeyError(f"{where}: missing required key {key!r}")
        _require(known["hidden_size"] % known["num_attention_heads"] == 0, where,
                 "hidden_size must be a multiple of num_attention_heads")
        _require((known["hidden_size"] // known["num_attention_heads"]) % 4 == 0, where,
                 "head_dim must be a multiple of 4 for the 2D rotary embedding")
        return cls(**known, extra=extra)

    @property
    def head_dim(self) -> int:
        """Width of one ViT attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def position_grid(self) -> int:
        """Side of the learned position table seen as a square grid."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """The official `vit_config` block."""
        return {**_fields_dict(self), "model_type": "siglip2_navit", **self.extra}


@dataclass
class OvisConfig:
    """The whole Ovis2.5 model: LLM + visual tokenizer (ViT + head) + visual embedding table."""

    llm: LLMConfig
    """The Qwen3 decoder."""
    vit: ViTConfig
    """The SigLIP2-NaViT vision tower."""
    visual_vocab_size: int = 65536
    """Rows of the VTE: visual_vocab_size - 4 head outputs plus 4 indicator rows."""
    torch_dtype: str = "bfloat16"
    """Dtype of the stored weights, as the config file records it."""
    conversation_formatter_class: str = "Qwen3ConversationFormatter"
    """Chat format name used by the official code (informational)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level keys that do not change the computation, written back unchanged."""

    @property
    def hidden_size(self) -> int:
        """Width of the LLM (and of the VTE rows)."""
        return self.llm.hidden_size

    @property
    def vocab_size(self) -> int:
        """Text vocabulary size of the LLM."""
        return self.llm.vocab_size

    @property
    def visual_head_size(self) -> int:
        """Outputs of the visual head: the VTE rows that are not indicator rows."""
        return self.visual_vocab_size - 4

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> OvisConfig:
        """Parse the official Ovis2.5 `config.json` content."""
        if not isinstance(raw, dict):
            raise TypeError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") != "ovis2_5":
            raise UnsupportedConfigError(f"{where}: model_type {raw.get('model_type')!r} is not 'ovis2_5'")
        for key in ("llm_config", "vit_config"):
            if key not in raw:
                raise KeyError(f"{where}: missing required key {key!r}")
        llm = LLMConfig.from_dict(raw["llm_config"], where=f"{where} llm_config")
        vit = ViTConfig.from_dict(raw["vit_config"], where=f"{where} vit_config")
        for key, value in (("hidden_size", llm.hidden_size), ("vocab_size", llm.vocab_size)):
            if key in raw and raw[key] != value:
                raise UnsupportedConfigError(f"{where}: {key}={raw[key]} differs from llm_config's {value}")
        handled = {"llm_config", "vit_config", "hidden_size", "vocab_size", "model_type", "architectures",
                   "visual_vocab_size", "torch_dtype", "conversation_formatter_class"}
        if "Ovis2_5" not in raw.get("architectures", ["Ovis2_5"]):
            raise UnsupportedConfigError(f"{where}: architectures {raw['architectures']!r} lack 'Ovis2_5'")
        visual_vocab_size = int(raw.get("visual_vocab_size", cls.visual_vocab_size))
        if visual_vocab_size <= 4:
            raise UnsupportedConfigError(f"{where}: visual_vocab_size must exceed 4, got {visual_vocab_size}")
        return cls(
            llm=llm,
            vit=vit,
            visual_vocab_size=visual_vocab_size,
            torch_dtype=raw.get("torch_dtype", cls.torch_dtype),
            conversation_formatter_class=raw.get("conversation_formatter_class", cls.conversation_formatter_class),
            extra={k: v for k, v in raw.items() if k not in handled},
        )

    def to_dict(self) -> dict[str, Any]:
        """The official Ovis2.5 `config.json` content."""
        out: dict[str, Any] = {
            "architectures": ["Ovis2_5"],
            "model_type": "ovis2_5",
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "visual_vocab_size": self.visual_vocab_size,
            "torch_dtype": self.torch_dtype,
            "conversation_formatter_class": self.conversation_formatter_class,
            "llm_config": self.llm.to_dict(),
            "vit_config": self.vit.to_dict(),
        }
        return {**out, **self.extra}

    @classmethod
    def from_file(cls, path: str | Path) -> OvisConfig:
        """Read a `config.json` file (errors name the file)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
        return cls.from_dict(raw, where=str(path))

    def save(self, path: str | Path) -> None:
        """Write `config.json` (pretty-printed, keys in a stable order)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
