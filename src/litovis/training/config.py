"""Typed settings of the training module, one dataclass per concern (each field documented).

LightningCLI turns these into YAML sections under `model:`; every shipped config comments each key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from litovis.inference.postprocess import PostprocessConfig


@dataclass
class ModelSource:
    """Where the base model and tokenizer come from.

    Attributes:
        checkpoint: local directory or Hugging Face repo id (read from the local cache, never the
            network) of an official-format Ovis2.5 checkpoint; None = random init from `preset`.
        preset: `tiny`, `2b` or `9b`: random weights of that shape (tests, benchmarks, the demo).
        tokenizer: tokenizer directory or repo id; None = the checkpoint's; `tiny` = the built-in
            512-token test tokenizer (goes with the `tiny` preset).
        dtype: dtype of the frozen base weights (`bfloat16`, `float16`, `float32`).
        attn_backend: `auto` (varlen flash kernel on CUDA, SDPA elsewhere), `sdpa` or `varlen`.
        seed: seed of the random init when no checkpoint is given.
        adapter: a PEFT LoRA directory (from `litovis export`) applied on the base, for
            predict/validate/test; continuing training from it is not supported (use `--ckpt_path`).
        init_std: std of the random init (None: the preset's `initializer_range`, 0.02); a
            narrow random model needs a larger one to learn anything through LoRA.
    """

    checkpoint: str | None = None
    preset: str | None = None
    tokenizer: str | None = None
    dtype: str = "bfloat16"
    attn_backend: str = "auto"
    seed: int = 0
    adapter: str | None = None
    init_std: float | None = None

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.preset is None):
            raise ValueError("give exactly one of model source `checkpoint` (real weights) or `preset` (random init)")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")


@dataclass
class Trainable:
    """Which parts train besides the LoRA adapters (all frozen in the reference run).

    Attributes:
        vit: train the SigLIP2 vision tower (full weights).
        visual_head: train the visual head (Linear + LayerNorm).
        vte: train the visual embedding table.
    """

    vit: bool = False
    visual_head: bool = False
    vte: bool = False


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay (defaults: the reference run).

    Attributes:
        lr: peak learning rate.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay.
        warmup_ratio: warm-up length as a fraction of `total_steps` (ignored if `warmup_steps` set).
        warmup_steps: warm-up length in optimizer steps.
        total_steps: schedule length in optimizer steps; None = the trainer's `max_steps`, else the
            data module's steps per epoch times `max_epochs` (never `estimated_stepping_batches`,
            which makes Lightning drop the saved data-loader state).
        min_lr_ratio: floor of the cosine as a fraction of `lr`.
        fused: fused AdamW kernel; None = on when the parameters are on CUDA.
    """

    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    fused: bool | None = None


@dataclass
class LossConfig:
    """Token loss settings (the kind, CE or DFT, is chosen per step by the `LossSchedule` callback).

    Attributes:
        chunk_size: tokens per chunk of the chunked CE/DFT (full logits are never materialised).
        label_smoothing: CE label smoothing; incompatible with DFT (raises at the switch).
    """

    chunk_size: int = 1024
    label_smoothing: float = 0.0


@dataclass
class MemoryConfig:
    """Speed/memory trade-offs.

    Attributes:
        gradient_checkpointing: recompute activations of decoder layers in backward: `true` = all
            LLM layers, `false` = none, an int k = the first k layers (the rest keep activations).
        compile: `torch.compile` each LLM decoder layer and each ViT encoder layer.
        activation_memory_budget: with `compile`, the share (0-1] of a compiled layer's
            activations kept for backward; the compiler recomputes the rest, cheapest ops first,
            dropout masks included. A finer trade than checkpointing whole layers; 1 = keep all.
        offload_layers: the first k LLM decoder layers keep their large saved activations (>= 1
            MiB each) in pinned host memory between forward and backward, copied on side streams
            that overlap compute (`litovis.training.activation_offload`); CUDA only; 0 = off.
    """

    gradient_checkpointing: bool | int = True
    compile: bool = False
    activation_memory_budget: float = 1.0
    offload_layers: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.activation_memory_budget <= 1:
            raise ValueError(f"activation_memory_budget must be in (0, 1], got {self.activation_memory_budget}")
        if self.activation_memory_budget < 1 and not self.compile:
            raise ValueError("activation_memory_budget < 1 works through torch.compile: set memory.compile: true")
        if self.offload_layers < 0:
            raise ValueError(f"offload_layers must be >= 0, got {self.offload_layers}")


Finetune = Literal["lora", "full"]


@dataclass
class PredictConfig:
    """Decoding settings of `litovis predict` (prompt batching lives in `data.batching`).

    Attributes:
        max_new_tokens: upper bound of generated tokens per sample.
        do_sample: sample instead of greedy decoding (the reference submission was greedy).
        temperature: sampling temperature (official 9B default 0.6).
        top_p: nucleus sampling mass.
        top_k: keep the k most likely tokens (0 = off).
        repetition_penalty: HF-style repetition penalty on generated tokens (1.0 = off).
        thinking_budget: with thinking prompts, tokens allowed before the thinking is closed by
            `thinking_suffix` (None = unlimited).
        thinking_suffix: text forced when the budget runs out; must end with `</think>` and a blank line.
        seed: sampling seed (a row's draws depend on its id, not on its batch).
        cuda_graphs: replay the decode step as a CUDA graph (CUDA only).
        fp8_prefill: run the prefill's projections (LLM and ViT layers) as FP8 matmuls, decode steps
            in bf16 (`litovis.model.fp8_prefill`; GPUs of compute capability 8.9+). Faster
            prefill, slightly different answers: off by default.
        decode_attention: decode-step attention over the KV cache: `"sdpa"`, `"matmul"`,
            `"split_kv"` (the Triton kernel of `litovis.model.split_kv_decoding`, CUDA; compiled
            decode step 23 % shorter than sdpa's at batch 128 on an H100) or `"auto"` (split_kv
            where Triton and CUDA are present, else sdpa). Same answers up to rounding.
        fp8_kv_cache: store the KV cache as float8 with per-vector scales (split_kv attention
            only): half the bytes per decode step, slightly different answers: off by default.
        postprocess: answer cleaning rules applied to every generation.
    """

    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    repetition_penalty: float = 1.0
    thinking_budget: int | None = None
    thinking_suffix: str = "\n\nTime is up, so I will answer now based on my thinking so far.\n</think>\n\n"
    seed: int = 0
    cuda_graphs: bool = True
    fp8_prefill: bool = False
    decode_attention: str = "auto"
    fp8_kv_cache: bool = False
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)


__all__ = [
    "Finetune",
    "PredictConfig",
    "LossConfig",
    "MemoryConfig",
    "ModelSource",
    "OptimizerConfig",
    "Trainable",
]
