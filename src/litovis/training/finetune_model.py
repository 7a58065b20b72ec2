"""`build_finetune_model`: the base Ovis2.5 made ready to fine-tune, as the module's settings say.

Loads (or randomly initialises) the base on the current device — or, for FSDP2, only builds it on
the meta device and fills each rank's shards afterwards — then adds LoRA (or a trained PEFT
adapter for inference), freezes what does not train, keeps float32 master copies of what does,
and sets activation checkpointing and compilation. PiSSA is not done here: it must run after a
checkpoint restore (see `OvisFineTuner`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from litovis.training.activation_offload import ActivationOffload
from litovis.training.config import Finetune, MemoryConfig, ModelSource, Trainable
from litovis.training.lora import LoRAConfig, apply_lora, seeded

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_finetune_model(
    source: ModelSource,
    finetune: Finetune,
    lora: LoRAConfig,
    trainable: Trainable,
    memory: MemoryConfig,
    sharding: tuple[Any, str, torch.device] | None = None,
) -> torch.nn.Module:
    """The model to train: a `PeftModel` around `Ovis2_5` (LoRA, adapter) or `Ovis2_5` itself (full).

    `sharding` = (device mesh, precision, device) shards it with FSDP2 (Lightning's
    `ModelParallelStrategy`); None builds it whole on the current default device.
    """
    mesh = sharding[0] if sharding is not None else None
    if mesh is not None and memory.compile:
        raise NotImplementedError("memory.compile is not supported with FSDP (ModelParallelStrategy) yet")
    if mesh is not None and memory.offload_layers:
        raise NotImplementedError("memory.offload_layers is not supported with FSDP (ModelParallelStrategy) yet")
    ovis = build_base(source, sharded=mesh is not None)
    ovis.set_attention_backend(source.attn_backend)
    ovis.train()  # load_ovis returns eval mode; LoRA dropout must be active
    ovis.requires_grad_(False)
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(ovis, source.adapter, is_trainable=False)
    elif finetune == "lora":
        with torch.device("meta") if mesh is not None else nullcontext():
            model = apply_lora(ovis, lora)
    else:
        ovis.llm.requires_grad_(True)
        model = ovis
    ovis.visual_tokenizer.vit.requires_grad_(trainable.vit)
    # Ovis2.5 never uses the tower's post_layernorm: trainable, it would never get a gradient
    # (DDP reports it as unused, and checkpoints would carry it for nothing).
    ovis.visual_tokenizer.vit.vision_model.post_layernorm.requires_grad_(False)
    ovis.visual_tokenizer.head.requires_grad_(trainable.visual_head)
    ovis.vte.requires_grad_(trainable.vte)
    # Adapters and fully trained weights keep float32 master copies; bf16 autocast computes.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    checkpointing = memory.gradient_checkpointing
    if isinstance(checkpointing, bool):
        ovis.llm.set_gradient_checkpointing(checkpointing)
    else:
        ovis.llm.set_gradient_checkpointing(True, num_layers=checkpointing)
    if memory.offload_layers:
        if next(ovis.parameters()).device.type != "cuda":
            raise ValueError("memory.offload_layers moves activations from a CUDA GPU to host memory: "
                             "train on CUDA or set it to 0")
        offload = ActivationOffload()
        offload.ignore_parameters(model)
        ovis.llm.set_saved_tensor_hooks(offload.hooks, memory.offload_layers)
    if memory.compile:
        if memory.activation_memory_budget < 1:
            import torch._functorch.config as functorch_config

            # the partitioner may then recompute activations; on CUDA random ones (dropout
            # masks) too, replayed from their Philox seeds
            functorch_config.activation_memory_budget = memory.activation_memory_budget
            functorch_config.functionalize_rng_ops = next(ovis.parameters()).device.type == "cuda"
        ovis.compile_layers()
    if mesh is not None:
        from litovis.training.sharding import fsdp_mesh, materialize_sharded, shard_ovis

        _, precision, device = sharding
        shard_ovis(model, ovis, fsdp_mesh(mesh), precision)
        materialize_sharded(model, ovis, device, source.checkpoint,
                            DTYPES[source.dtype], source.init_std, source.seed, lora.seed)
        ovis.touch_vision_without_images = "always"
    else:
        vision_trains = trainable.vit or trainable.visual_head or trainable.vte
        ovis.touch_vision_without_images = vision_trains
    return model


def build_base(source: ModelSource, sharded: bool) -> torch.nn.Module:
    """The base model: loaded or randomly initialised on the current device, or (`sharded`) only
    built on the meta device, its weights filled after sharding."""
    from litovis.model.checkpoint import build_ovis, load_ovis, resolve_checkpoint_dir
    from litovis.model.config import OvisConfig
    from litovis.model.presets import preset

    dtype = DTYPES[source.dtype]
    if source.checkpoint is not None:
        if sharded:
            config = OvisConfig.from_file(resolve_checkpoint_dir(source.checkpoint) / "config.json")
            return build_ovis(config, dtype=dtype, device="meta")
        ovis, _ = load_ovis(source.checkpoint, dtype=dtype, device=torch.get_default_device())
        return ovis
    if sharded:
        return build_ovis(preset(source.preset), dtype=dtype, device="meta")
    # `source.seed` decides the weights only: the run's own RNG stream (dropout) stays `seed_everything`'s
    with seeded(source.seed):
        return build_ovis(preset(source.preset), dtype=dtype, device=torch.get_default_device(),
                          init_std=source.init_std)
