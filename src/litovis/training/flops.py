"""Model FLOPs of a training step, as defined in the reference performance notes.

- LLM: per token 2·N forward + 2·N input-gradient backward for a frozen base (LoRA), 6·N when the
  LLM trains fully; N = matmul parameters of the LLM without the input embedding (lm_head counted).
  LoRA adapters' own FLOPs and activation-checkpointing recomputation are not counted.
- Causal attention: 6 · layers · L² · heads · head_dim per sample of length L (forward + backward).
- Frozen vision: forward only — 2 · ViT matmul parameters per patch, 2 · (head + VTE) per atom.
MFU = these FLOPs per second / a bf16 matmul rate measured on the same GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from litovis.model.config import OvisConfig


def llm_matmul_params(cfg: OvisConfig) -> int:
    """Parameters of the LLM used in matmuls per token (all projections + lm_head)."""
    llm = cfg.llm
    q = llm.hidden_size * llm.num_attention_heads * llm.head_dim
    kv = 2 * llm.hidden_size * llm.num_key_value_heads * llm.head_dim
    mlp = 3 * llm.hidden_size * llm.intermediate_size
    return llm.num_hidden_layers * (2 * q + kv + mlp) + llm.vocab_size * llm.hidden_size


def vit_matmul_params(cfg: OvisConfig) -> int:
    """Parameters of the ViT used in matmuls per patch (patch embedding + layers)."""
    vit = cfg.vit
    per_layer = 4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.intermediate_size
    return vit.num_channels * vit.patch_size**2 * vit.hidden_size + vit.num_hidden_layers * per_layer


def visual_token_params(cfg: OvisConfig) -> int:
    """Parameters used in matmuls per visual atom (visual head + VTE product)."""
    merged = cfg.vit.hidden_size * cfg.vit.hidden_stride**2
    return merged * (cfg.visual_vocab_size - 4) + cfg.visual_vocab_size * cfg.llm.hidden_size


def training_flops(
    cfg: OvisConfig,
    sample_lengths: Sequence[int],
    num_patches: int = 0,
    full_llm: bool = False,
    vision_trains: bool = False,
) -> float:
    """Model FLOPs of forward + backward over samples of the given lengths and their images."""
    llm = cfg.llm
    tokens = sum(sample_lengths)
    per_token = (6 if full_llm else 4) * llm_matmul_params(cfg)
    attention = 6 * llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim * sum(n * n for n in sample_lengths)
    vision_factor = 6 if vision_trains else 2
    atoms = num_patches // cfg.vit.hidden_stride**2
    vision = vision_factor * (num_patches * vit_matmul_params(cfg) + atoms * visual_token_params(cfg))
    return float(tokens * per_token + attention + vision)


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
    seconds = start.elapsed_time(end) / 1000 / repeats
    return 2 * size**3 / seconds / 1e12
