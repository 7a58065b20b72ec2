"""The two stacks bench/train_step.py times: litovis's training module and transformers + peft.

`build_litovis` builds `OvisFineTuner` exactly as `litovis fit` does; `build_baseline` is
transformers' Qwen3ForCausalLM (the 9B's LLM) with peft LoRA of the same settings. Both run one
optimizer step through `optimizer_step`. Imported by bench/train_step.py, not run on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from train_workloads import TASKS, Scale

from litovis.data.batching import PackedBatch
from litovis.model.config import LLMConfig
from litovis.model.tokens import IGNORE_INDEX
from litovis.training.config import LossConfig, MemoryConfig, ModelSource
from litovis.training.lora import LLM_PROJECTIONS, LoRAConfig
from litovis.training.module import OvisFineTuner


def build_litovis(scale: Scale, compiled: bool, device: torch.device, attention: str = "auto",
                  dropout: float = 0.05, act_budget: float = 1.0, loss_chunk: int = 1024,
                  offload_layers: int = 0) -> OvisFineTuner:
    """The training module exactly as `litovis fit` builds it (random init, LoRA `default` init)."""
    module = OvisFineTuner(
        ModelSource(preset=scale.preset, dtype="bfloat16", attn_backend=attention),
        lora=LoRAConfig(init="default", dropout=dropout),
        memory=MemoryConfig(gradient_checkpointing=True, compile=compiled, activation_memory_budget=act_budget,
                            offload_layers=offload_layers),
        loss=LossConfig(chunk_size=loss_chunk),
        task_names=TASKS,
    )
    with torch.device(device):
        module.configure_model()
    return module.to(device).train()


def optimizer_step(loss_of: Callable, params: list, optimizer: torch.optim.Optimizer, clip: float,
                   device: torch.device, before_step: Callable | None = None) -> Callable:
    """One optimizer step over host micro-batches: each one's loss under bf16 autocast and its backward,
    then `before_step(optimizer)` (a hook), gradient clipping, the optimizer and `zero_grad`."""

    def step(micro_batches: list) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for host_batch in micro_batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_of(host_batch)
            loss.backward()
            total += loss.detach()
        if before_step is not None:
            before_step(optimizer)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def litovis_step(module: OvisFineTuner, optimizer: torch.optim.Optimizer, clip: float, device: torch.device) -> Callable:
    """What Lightning runs per step: `training_loss` per micro-batch, the module's grad-norm hook."""

    def loss_of(host_batch: PackedBatch) -> torch.Tensor:
        batch = host_batch.to(device)
        return module.training_loss(batch, torch.as_tensor(float(batch.step_num_targets), device=device))

    params = [p for p in module.parameters() if p.requires_grad]
    return optimizer_step(loss_of, params, optimizer, clip, device, module.on_before_optimizer_step)


def build_baseline(llm: LLMConfig, lora: LoRAConfig, device: torch.device) -> torch.nn.Module:
    """transformers Qwen3ForCausalLM + peft LoRA, SDPA, non-reentrant checkpointing on every layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads, head_dim=llm.head_dim,
        max_position_embeddings=llm.max_position_embeddings, rope_theta=llm.rope_theta,
        rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=llm.tie_word_embeddings, use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.rslora,
                             target_modules=list(LLM_PROJECTIONS), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config).train()


def baseline_batches(scale: Scale, steps: int, vocab: int, pin: bool) -> list[list[dict[str, torch.Tensor]]]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(steps):
        ids = torch.from_numpy(rng.integers(0, vocab, (scale.text_samples, scale.text_length)))
        labels = ids.clone()
        labels[:, 0] = IGNORE_INDEX  # same targets as workload a (HF shifts, so this is moot)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        out.append([{k: v.pin_memory() for k, v in batch.items()} if pin else batch])
    return out


def baseline_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: float, device: torch.device) -> Callable:
    """HF's own loss (`labels=`) per micro-batch."""

    def loss_of(host_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**{k: v.to(device, non_blocking=True) for k, v in host_batch.items()}).loss

    params = [p for p in model.parameters() if p.requires_grad]
    return optimizer_step(loss_of, params, optimizer, clip, device)


def fused_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), fused=params[0].is_cuda)

