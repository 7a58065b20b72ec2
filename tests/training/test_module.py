"""OvisFineTuner pieces that need no Trainer: the LR schedule and checkpoint key checks."""

import math

import pytest
import torch

from litovis.training.config import ModelSource
from litovis.training.lora import LoRAConfig
from litovis.training.module import OvisFineTuner, lr_factor


def test_warmup_then_cosine_to_the_floor() -> None:
    assert lr_factor(0, total=100, warmup=9) == pytest.approx(0.1)
    assert lr_factor(8, total=100, warmup=9) == pytest.approx(0.9)
    assert lr_factor(9, total=100, warmup=9) == pytest.approx(1.0)
    midway = 9 + (100 - 9) / 2
    assert lr_factor(int(midway), total=100, warmup=9) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(midway) - 9) / 91)))
    assert lr_factor(100, total=100, warmup=9, floor=0.1) == pytest.approx(0.1)
    assert lr_factor(500, total=100, warmup=9) == pytest.approx(0.0)


def test_restart_rewarms_to_the_peak_and_decays_to_the_end() -> None:
    before = lr_factor(2599, total=2900, warmup=273, restart=(2600, 30))
    assert before < 0.05  # late in the SFT cosine
    assert lr_factor(2600, total=2900, warmup=273, restart=(2600, 30)) == pytest.approx(1 / 31)
    assert lr_factor(2630, total=2900, warmup=273, restart=(2600, 30)) == pytest.approx(1.0)
    assert lr_factor(2900, total=2900, warmup=273, restart=(2600, 30)) == pytest.approx(0.0)


def tiny_module(**kwargs) -> OvisFineTuner:
    module = OvisFineTuner(ModelSource(preset="tiny", tokenizer="tiny", dtype="float32"), lora=LoRAConfig(rank=2, init="default"), **kwargs)
    module.configure_model()
    return module


def test_configure_model_is_idempotent_and_trains_only_adapters() -> None:
    module = tiny_module()
    model = module.model
    module.configure_model()
    assert module.model is model
    names = module.trainable_names()
    assert names and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for n, p in module.named_parameters() if p.requires_grad)


def test_a_checkpoint_with_a_renamed_or_missing_key_fails_loudly() -> None:
    module = tiny_module()
    state = {k: v for k, v in module.state_dict().items() if k in set(module.trainable_names())}
    first = next(iter(state))
    renamed = dict(state)
    renamed[first.replace("lora_A", "lora_X")] = renamed.pop(first)
    with pytest.raises(KeyError, match="1 missing .* 1 unexpected"):
        module.on_load_checkpoint({"state_dict": renamed})
    missing = dict(state)
    missing.pop(first)
    with pytest.raises(KeyError, match="1 missing"):
        module.on_load_checkpoint({"state_dict": missing})


def test_pissa_checkpoint_must_carry_its_initial_state() -> None:
    module = OvisFineTuner(ModelSource(preset="tiny", dtype="float32"), lora=LoRAConfig(rank=2, init="pissa_niter_1"))
    module.configure_model()
    state = {k: v for k, v in module.state_dict().items() if k in set(module.trainable_names())}
    with pytest.raises(KeyError, match="PiSSA"):
        module.on_load_checkpoint({"state_dict": state})


def test_full_finetune_trains_the_llm_only() -> None:
    module = OvisFineTuner(ModelSource(preset="tiny", dtype="float32"), finetune="full")
    module.configure_model()
    names = module.trainable_names()
    assert names and all(n.startswith("model.llm.") for n in names)
    with pytest.raises(ValueError, match="finetune"):
        OvisFineTuner(ModelSource(preset="tiny"), finetune="partial")
