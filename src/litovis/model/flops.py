"""Model FLOPs of Ovis2.5, for throughput and MFU.

Training FLOPs follow the reference performance notes so figures compare with its anchors:
- LLM: per token 2·N forward + 2·N input-gradient backward for a frozen base (LoRA), 6·N when the
  LLM trains fully; N = matmul weights of the LLM without the input embedding (lm_head counted).
  LoRA adapters' own FLOPs and activation-checkpointing recomputation are not counted.
- Causal attention: 6 · layers · L² · heads · head_dim per sample of length L (forward + backward).
- Frozen vision: forward only — 2 · ViT matmul weights per patch (ViT attention not counted, as in
  the anchors), 2 · (visual head + VTE) per visual atom.
MFU = these FLOPs per second / a bf16 matmul rate measured on the same GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from litovis.model.config import LLMConfig, OvisConfig, ViTConfig


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


def training_flops(
    config: OvisConfig,
    sample_lengths: Sequence[int],
    num_patches: int = 0,
    full_llm: bool = False,
    vision_trains: bool = False,
) -> float:
    """Model FLOPs of forward + backward over packed samples of the given lengths and their images."""
    llm = config.llm
    matmuls = (6 if full_llm else 4) * llm_matmul_params(llm) * sum(sample_lengths)
    attention = 6 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim * sum(n * n for n in sample_lengths)
    atoms = num_patches // config.vit.hidden_stride**2
    vision = num_patches * vit_forward_flops_per_patch(config.vit, 0) + atoms * visual_head_forward_flops_per_atom(config)
    return float(matmuls + attention + (3 if vision_trains else 1) * vision)


def measure_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """bf16 matmul rate of this GPU in TFLOP/s (the MFU denominator), timed with CUDA events."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * size**3 / (start.elapsed_time(end) / 1000 / repeats) / 1e12
