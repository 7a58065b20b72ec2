"""OvisFineTuner without a fit loop: model set-up, checkpoint key checks, task names,
`training_loss`, `training_step`'s scaling and `build_optimizer`.

Reference losses are computed from full logits (`Ovis2_5.forward`'s logits, float32
cross-entropy), independently of the chunked loss the module uses.
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from litovis.data.batching import EncodedSample, PackedBatch, collate_packed
from litovis.model.tokens import IGNORE_INDEX
from litovis.training.config import MemoryConfig, ModelSource, OptimizerConfig, Trainable
from litovis.training.lora import LoRAConfig
from litovis.training.module import OvisFineTuner


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


TASKS = ["captioning", "text_qa"]


def make_module(**kwargs) -> OvisFineTuner:
    module = OvisFineTuner(
        ModelSource(preset="tiny", dtype="float32", init_std=0.1),
        lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0, init="default"),
        memory=MemoryConfig(gradient_checkpointing=False),
        task_names=TASKS,
        **kwargs,
    )
    module.configure_model()
    with torch.no_grad():  # B = 0 would make the adapters a no-op; give them a value
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return module


def sample(name: str, task: str, prompt: int, answer: int, image_side: int | None, seed: int) -> EncodedSample:
    """Random prompt ids, an optional image span after the first prompt token, labelled answer ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (prompt + answer,), generator=gen)
    labels = ids.clone()
    labels[:prompt] = IGNORE_INDEX
    pixel_values = grid = None
    if image_side is not None:
        patches = image_side // 16
        atoms = patches * patches // 4
        span = torch.tensor([-301] + [-300] * atoms + [-302])
        ids = torch.cat([ids[:1], span, ids[1:]])
        labels = torch.cat([labels[:1], torch.full_like(span, IGNORE_INDEX), labels[1:]])
        pixel_values = torch.randn(patches * patches, 768, generator=gen)
        grid = torch.tensor([[1, patches, patches]])
    return EncodedSample(name, task, ids, labels, pixel_values, grid)


def optimizer_step_batches() -> list[PackedBatch]:
    """One optimizer step of two packed micro-batches; `step_num_targets` filled as the loader does."""
    first = collate_packed([sample("a", "captioning", 5, 7, 64, 1), sample("b", "text_qa", 9, 4, None, 2)], TASKS)
    second = collate_packed([sample("c", "text_qa", 6, 11, None, 3)], TASKS)
    total = first.num_targets + second.num_targets
    for batch in (first, second):
        batch.step_num_targets = total
    return [first, second]


def reference_token_losses(module: OvisFineTuner, batch: PackedBatch) -> torch.Tensor:
    """Per-target CE from full float32 logits, samples shifted one by one (no packing tricks)."""
    logits = module.model(
        input_ids=batch.input_ids, pixel_values=batch.pixel_values, grid_thws=batch.grid_thws,
        position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
    ).logits[0].float()
    bounds = batch.cu_seqlens.tolist()
    losses = []
    for start, end in itertools.pairwise(bounds):
        losses.append(F.cross_entropy(logits[start : end - 1], batch.labels[0, start + 1 : end], reduction="none",
                                      ignore_index=IGNORE_INDEX)[batch.labels[0, start + 1 : end] != IGNORE_INDEX])
    return torch.cat(losses)


@pytest.mark.parametrize("kind", ["ce", "dft"])
def test_training_loss_sums_to_the_step_mean(kind: str) -> None:
    module = make_module()
    module.loss_kind = kind
    batches = optimizer_step_batches()
    total = batches[0].step_num_targets
    got = sum(module.training_loss(b, torch.tensor(float(total))) for b in batches)
    with torch.no_grad():
        ce = torch.cat([reference_token_losses(module, b) for b in batches])
    per_token = ce if kind == "ce" else ce * torch.exp(-ce)
    assert ce.numel() == total
    torch.testing.assert_close(got.detach(), per_token.sum() / total, rtol=1e-5, atol=1e-6)
    # the running statistics saw every target of the step once
    assert module._train_stats.targets == total


def test_training_loss_gradient_matches_full_logits() -> None:
    module = make_module()
    (batch,) = optimizer_step_batches()[1:]
    targets = torch.tensor(float(batch.num_targets))
    trainable = [p for p in module.parameters() if p.requires_grad]
    got = torch.autograd.grad(module.training_loss(batch, targets), trainable)
    expected = torch.autograd.grad(reference_token_losses(module, batch).mean(), trainable)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_training_step_undoes_lightning_accumulation_averaging() -> None:
    module = make_module()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=3, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    batch = optimizer_step_batches()[0]
    step = module.training_step(batch, 0)
    plain = module.training_loss(batch, torch.tensor(float(batch.step_num_targets)))
    torch.testing.assert_close(step, 3 * plain)


def test_build_optimizer_covers_exactly_the_trainable_parameters() -> None:
    module = make_module(optimizer=OptimizerConfig(lr=3e-4, betas=(0.8, 0.9), weight_decay=0.1))
    optimizer = module.build_optimizer()
    (group,) = optimizer.param_groups
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in group["params"]} == {id(p) for p in trainable}
    assert len(group["params"]) == len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert all(p.dtype == torch.float32 for p in trainable)
    assert (group["lr"], group["betas"], group["weight_decay"], group["fused"]) == (3e-4, (0.8, 0.9), 0.1, False)


def test_build_optimizer_refuses_a_fully_frozen_model() -> None:
    module = make_module()
    module.requires_grad_(False)
    with pytest.raises(RuntimeError, match="nothing to train"):
        module.build_optimizer()


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


def test_fused_adamw_with_bf16_autocast_clips_the_gradient_norm() -> None:
    """Lightning refuses clipping with fused optimizers under mixed precision; the module clips itself."""
    module = make_module(optimizer=OptimizerConfig(lr=1e-3, fused=True))
    seen: list[float] = []

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pl_module.parameters() if p.grad is not None]))))

    class AfterClip(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack(grads))))

    batch = collate_packed([sample("a", "captioning", 5, 7, 64, 1)], TASKS)
    batch.step_num_targets = batch.num_targets
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=1, gradient_clip_val=1e-4,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Probe(), AfterClip()])
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    before, after = seen
    assert before > 1e-4 and after == pytest.approx(1e-4, rel=1e-2)
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(before, rel=1e-4)  # logged before clipping


class TaskVocabulary(L.LightningDataModule):
    """One optimizer step of packed batches whose task indices refer to `task_names`."""

    def __init__(self, task_names: list[str]) -> None:
        super().__init__()
        self.task_names = task_names

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        batch = collate_packed([sample("a", "text_qa", 5, 7, None, 1), sample("b", "vqa", 6, 3, 64, 2)], self.task_names)
        batch.step_num_targets = batch.num_targets
        return torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)


def fit_one_step(module: OvisFineTuner, data: L.LightningDataModule) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    return trainer


def test_task_names_come_from_the_data_module() -> None:
    module = OvisFineTuner(ModelSource(preset="tiny", dtype="float32"), lora=LoRAConfig(rank=2, init="default"))
    trainer = fit_one_step(module, TaskVocabulary(["vqa", "captioning", "text_qa"]))
    assert module.task_names == ["vqa", "captioning", "text_qa"]
    assert {"train/ce_vqa", "train/ce_text_qa"} <= set(trainer.callback_metrics)
    assert "train/ce_captioning" not in trainer.callback_metrics  # no captioning sample in the step
    assert float(trainer.callback_metrics["train/grad_norm"]) > 0  # logged without clipping too


@pytest.mark.parametrize("given", [["text_qa", "vqa"], ["vqa"]], ids=["other-order", "fewer"])
def test_task_names_that_contradict_the_data_module_are_refused(given: list[str]) -> None:
    module = OvisFineTuner(ModelSource(preset="tiny", dtype="float32"), lora=LoRAConfig(rank=2, init="default"),
                           task_names=given)
    with pytest.raises(ValueError, match="task vocabulary"):
        fit_one_step(module, TaskVocabulary(["vqa", "text_qa"]))
    agreeing = OvisFineTuner(ModelSource(preset="tiny", dtype="float32"), lora=LoRAConfig(rank=2, init="default"),
                             task_names=["vqa", "text_qa"])
    fit_one_step(agreeing, TaskVocabulary(["vqa", "text_qa"]))
    assert agreeing.task_names == ["vqa", "text_qa"]
