"""The whole model: official logits, merge rules, packing, loss, checkpointing, DDP dummy path, FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from litovis.model.checkpoint import build_ovis
from litovis.model.ovis import (
    Ovis2_5,
)
from litovis.model.presets import preset
from litovis.model.tokens import IGNORE_INDEX


def test_logits_equal_the_official_implementation(reference_model: Ovis2_5, expected: dict) -> None:
    with torch.no_grad():
        out = reference_model(expected["input_ids"], expected["pixel_values"], expected["grid_thws"],
                              attention_mask=expected["attention_mask"])
    real = expected["attention_mask"].bool()
    assert (out.logits[real] - expected["logits"][real]).abs().max() < 1e-4
    assert out.loss is None and out.hidden_states is None


def _samples(expected: dict) -> list[dict]:
    """Three samples from the reference batch: two with images, one text-only."""
    grids, pixels, ids = expected["grid_thws"], expected["pixel_values"], expected["input_ids"]
    patches = [int(g.prod()) for g in grids]
    real_1 = int(expected["attention_mask"][1].sum())
    return [
        {"ids": ids[1, :real_1], "pixels": pixels[patches[0] + patches[1]:], "grids": grids[2:]},
        {"ids": torch.tensor([5, 6, 7, 8, 9, 10]), "pixels": None, "grids": None},
        {"ids": ids[0], "pixels": pixels[:patches[0] + patches[1]], "grids": grids[:2]},
    ]


def test_packed_row_equals_each_sample_alone(reference_model: Ovis2_5, expected: dict) -> None:
    samples = _samples(expected)
    ids = torch.cat([s["ids"] for s in samples])[None]
    lengths = [len(s["ids"]) for s in samples]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    pixels = torch.cat([s["pixels"] for s in samples if s["pixels"] is not None])
    grids = torch.cat([s["grids"] for s in samples if s["grids"] is not None])
    with torch.no_grad():
        packed = reference_model(ids, pixels, grids, position_ids=positions, cu_seqlens=cu,
                                 max_seqlen=max(lengths)).logits[0]
        for sample, start, end in zip(samples, cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            alone = reference_model(sample["ids"][None], sample["pixels"], sample["grids"]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)


def test_indicators_and_atoms_take_their_vte_rows(reference_model: Ovis2_5, expected: dict) -> None:
    model = reference_model
    ids = torch.tensor([[3, -301, -302, -303, -304, 4]])
    with torch.no_grad():
        embeds = model.merge_multimodal(ids)
        vte = model.vte.weight
        torch.testing.assert_close(embeds[0, 1:5], vte[-4:])
        torch.testing.assert_close(embeds[0, [0, 5]], model.llm.model.embed_tokens.weight[[3, 4]])
        sample = _samples(expected)[2]
        merged = model.merge_multimodal(sample["ids"][None], sample["pixels"], sample["grids"])
        atoms = model.visual_tokens(sample["pixels"], sample["grids"]) @ vte
    torch.testing.assert_close(merged[0, sample["ids"] == -300], atoms)


def test_merge_errors_are_explicit(reference_model: Ovis2_5, expected: dict) -> None:
    sample = _samples(expected)[0]
    fewer = torch.cat([sample["ids"][:3], sample["ids"][4:]])[None]  # one -300 removed
    with pytest.raises(ValueError, match="visual atom positions"):
        reference_model.merge_multimodal(fewer, sample["pixels"], sample["grids"])
    with pytest.raises(ValueError, match="no pixel_values"):
        reference_model.merge_multimodal(sample["ids"][None])
    with pytest.raises(ValueError, match="unexpanded placeholder -200"):
        reference_model.merge_multimodal(torch.tensor([[1, -200, 2]]))
    with pytest.raises(ValueError, match=r"unknown negative ids \[-100\]"):
        reference_model.merge_multimodal(torch.tensor([[1, -100, 2]]))


def _labelled_batch(expected: dict) -> dict:
    """The reference batch with labels on every real text token after the first."""
    ids, mask = expected["input_ids"], expected["attention_mask"]
    labels = torch.where((ids >= 0) & mask.bool(), ids, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return dict(input_ids=ids, pixel_values=expected["pixel_values"], grid_thws=expected["grid_thws"],
                attention_mask=mask, labels=labels)


def test_loss_is_mean_shifted_cross_entropy(reference_model: Ovis2_5, expected: dict) -> None:
    batch = _labelled_batch(expected)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        out = reference_model(**batch)
    log_probs = F.log_softmax(out.logits, dim=-1)
    terms = [-log_probs[b, t - 1, labels[b, t]] for b in range(ids.shape[0]) for t in range(1, ids.shape[1])
             if labels[b, t] != IGNORE_INDEX]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def test_return_hidden_gives_states_whose_head_is_the_logits(reference_model: Ovis2_5, expected: dict) -> None:
    args = (expected["input_ids"], expected["pixel_values"], expected["grid_thws"])
    with torch.no_grad():
        hidden = reference_model(*args, attention_mask=expected["attention_mask"], return_hidden=True)
        logits = reference_model(*args, attention_mask=expected["attention_mask"]).logits
    assert hidden.logits is None
    torch.testing.assert_close(reference_model.llm.logits(hidden.hidden_states), logits)


def _lora_like(model: Ovis2_5) -> list[torch.nn.Parameter]:
    """Freeze everything but a few LLM projections, as LoRA training leaves it."""
    for param in model.parameters():
        param.requires_grad_(False)
    chosen = []
    for layer in model.llm.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj):
            proj.weight.requires_grad_(True)
            chosen.append(proj.weight)
    return chosen


def test_gradient_checkpointing_gives_the_same_gradients(reference_model: Ovis2_5, expected: dict) -> None:
    model = copy.deepcopy(reference_model).train()
    trainable = _lora_like(model)
    batch = _labelled_batch(expected)
    loss = model(**batch).loss
    plain = torch.autograd.grad(loss, trainable)
    model.llm.set_gradient_checkpointing(True)
    loss_ckpt = model(**batch).loss
    recomputed = torch.autograd.grad(loss_ckpt, trainable)
    torch.testing.assert_close(loss_ckpt, loss)
    for got, want in zip(recomputed, plain, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want)


def test_compiled_layers_give_the_same_loss_and_gradients(reference_model: Ovis2_5, expected: dict) -> None:
    """`compile_layers` (LLM layers whole, ViT layers around their attention): equal loss and
    gradients, the ViT's included, so a trainable vision tower trains the same compiled."""
    model = copy.deepcopy(reference_model).train()
    trainable = [*_lora_like(model), model.visual_tokenizer.vit.vision_model.encoder.layers[0].mlp.fc1.weight]
    trainable[-1].requires_grad_(True)
    batch = _labelled_batch(expected)
    loss = model(**batch).loss
    plain = torch.autograd.grad(loss, trainable)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        model.compile_layers(backend="aot_eager")
        compiled_loss = model(**batch).loss
        compiled = torch.autograd.grad(compiled_loss, trainable)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= 3, f"{graphs} graphs: the LLM layer and the ViT's two halves should each have one"
    torch.testing.assert_close(compiled_loss, loss)
    for got, want in zip(compiled, plain, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want)


def test_text_only_batch_can_touch_vision_with_zero_effect(reference_model: Ovis2_5) -> None:
    model = copy.deepcopy(reference_model).train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = ids.clone()
    vision = [p for p in (*model.visual_tokenizer.parameters(), model.vte.weight) if p.requires_grad]
    assert not model.visual_tokenizer.vit.vision_model.post_layernorm.weight.requires_grad  # unused by Ovis2.5
    plain = model(ids, labels=labels).loss
    plain.backward()
    assert all(p.grad is None for p in vision)
    model.touch_vision_without_images = True
    touched = model(ids, labels=labels).loss
    touched.backward()
    assert torch.equal(touched, plain)
    assert all(p.grad is not None and not p.grad.any() for p in vision)


def test_always_touching_runs_the_vision_tower_without_grad_too(reference_model: Ovis2_5) -> None:
    # FSDP: every rank must run the same sharded modules, in evaluation as well.
    model = copy.deepcopy(reference_model).eval()
    calls = []
    model.visual_tokenizer.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        plain = model(ids).logits
        model.touch_vision_without_images = True  # DDP mode: only when grad is enabled
        assert torch.equal(model(ids).logits, plain) and not calls
        model.touch_vision_without_images = "always"
        assert torch.equal(model(ids).logits, plain) and len(calls) == 1


def test_head_loss_runs_inside_forward_on_the_output_weight(reference_model: Ovis2_5, expected: dict) -> None:
    batch = dict(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"],
                 grid_thws=expected["grid_thws"], attention_mask=expected["attention_mask"])
    seen = []

    def head_loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        seen.append(weight)
        return (hidden @ weight.T).sum()

    with torch.no_grad():
        out = reference_model(**batch, head_loss=head_loss)
        hidden = reference_model(**batch, return_hidden=True).hidden_states
    assert seen == [reference_model.llm.output_weight]
    assert torch.equal(out.hidden_states, hidden)
    torch.testing.assert_close(out.head_loss, reference_model.llm.logits(hidden).sum())


def test_parameter_breakdown_adds_up() -> None:
    model = build_ovis(preset("tiny"), device="meta")
    counts = model.num_parameters()
    assert counts["total"] == counts["llm"] + counts["vit"] + counts["head"] + counts["vte"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())



@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
def test_low_precision_runs_close_to_float32(tiny_reference_dir, expected: dict, mode: str) -> None:
    from litovis.model.checkpoint import load_ovis

    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    model, _ = load_ovis(tiny_reference_dir, dtype=dtype)
    model.train()
    model.llm.set_gradient_checkpointing(True)
    ids = expected["input_ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = model(ids, expected["pixel_values"], expected["grid_thws"], attention_mask=expected["attention_mask"],
                    labels=torch.where(ids >= 0, ids, IGNORE_INDEX))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    real = expected["attention_mask"].bool()
    assert (out.logits.float()[real] - expected["logits"][real]).abs().max() < 0.1
    assert model.llm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
