"""`OvisFineTuner` pieces that distributed strategies rely on (the runs themselves: test_distributed)."""

from __future__ import annotations

import torch

from litovis.training.config import MemoryConfig, ModelSource, Trainable
from litovis.training.lora import LoRAConfig
from litovis.training.module import OvisFineTuner


def tiny_module(**kwargs) -> OvisFineTuner:
    module = OvisFineTuner(
        ModelSource(preset="tiny", tokenizer="tiny", dtype="float32"),
        lora=LoRAConfig(rank=4, alpha=8.0, init="default"),
        memory=MemoryConfig(gradient_checkpointing=False),
        **kwargs,
    )
    module.configure_model()
    return module


def test_state_dict_holds_the_trainable_weights_only_also_when_nested() -> None:
    # Sharded strategies build (and load) checkpoints from `state_dict`: the frozen base must not
    # be in it. DDP calls it on a wrapper, with a prefix and a shared destination.
    module = tiny_module(trainable=Trainable(visual_head=True))
    trainable = module.trainable_names()
    assert any("lora_A" in n for n in trainable) and any("visual_tokenizer.head" in n for n in trainable)
    assert len(trainable) < len(list(module.named_parameters()))
    assert list(module.state_dict()) == trainable
    wrapper = torch.nn.ModuleDict({"inner": module, "other": torch.nn.Linear(2, 2)})
    assert sorted(wrapper.state_dict()) == sorted(["other.weight", "other.bias", *(f"inner.{n}" for n in trainable)])


def test_vision_is_touched_without_images_only_when_it_trains() -> None:
    assert tiny_module().ovis.touch_vision_without_images is False
    assert tiny_module(trainable=Trainable(vte=True)).ovis.touch_vision_without_images is True
    trains_vit = tiny_module(trainable=Trainable(vit=True))
    post = trains_vit.ovis.visual_tokenizer.vit.vision_model.post_layernorm
    assert not any(p.requires_grad for p in post.parameters())  # unused by Ovis2.5: never trained
