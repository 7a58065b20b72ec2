"""LoRA wrapping and the resumable PiSSA init on the tiny model."""

import pytest
import torch

from litovis.model.checkpoint import build_ovis
from litovis.model.presets import preset
from litovis.training.lora import (
    LoRAConfig,
    apply_lora,
    lora_layers,
    pissa_initialize,
    pissa_niter,
    restore_pissa_residual,
    target_regex,
)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_ovis(preset("tiny"), dtype=torch.float32)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 99, 3, 250, 8]])


def test_only_llm_projections_are_wrapped_and_trainable() -> None:
    model = apply_lora(tiny_model(), LoRAConfig(rank=4))
    layers = lora_layers(model)
    llm = preset("tiny").llm
    assert len(layers) == 7 * llm.num_hidden_layers
    assert all(".llm.model.layers." in name for name in layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_target_subset_and_validation() -> None:
    model = apply_lora(tiny_model(), LoRAConfig(rank=2, targets=["q_proj", "down_proj"]))
    names = sorted({name.rsplit(".", 1)[-1] for name in lora_layers(model)})
    assert names == ["down_proj", "q_proj"]
    assert "vte" not in target_regex(["q_proj"])
    with pytest.raises(ValueError, match="subset"):
        LoRAConfig(targets=["embed_tokens"])
    with pytest.raises(ValueError, match="unknown LoRA init"):
        LoRAConfig(init="loftq")
    assert pissa_niter("pissa") is None and pissa_niter("pissa_niter_7") == 7


def test_rslora_scale() -> None:
    assert LoRAConfig(rank=64, alpha=128, rslora=True).scale == 16.0
    assert LoRAConfig(rank=64, alpha=128, rslora=False).scale == 2.0
    model = apply_lora(tiny_model(), LoRAConfig(rank=4, alpha=8, rslora=True))
    layer = next(iter(lora_layers(model).values()))
    assert layer.scaling["default"] == pytest.approx(4.0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3"])
def test_pissa_keeps_the_function_and_moves_top_directions(init: str) -> None:
    base = tiny_model()
    before = logits(base, IDS)
    original = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith("q_proj")}
    model = apply_lora(base, LoRAConfig(rank=4, init=init, dropout=0.0))
    pissa_initialize(model, LoRAConfig(rank=4, init=init))
    torch.testing.assert_close(logits(model, IDS), before, atol=1e-4, rtol=1e-4)
    name, layer = next((n, m) for n, m in lora_layers(model).items() if n.endswith("q_proj"))
    residual = layer.get_base_layer().weight
    assert not torch.allclose(residual, original[name.removeprefix("base_model.model.")])
    if init == "pissa":  # full SVD: the adapter holds exactly the top singular values
        top = torch.linalg.svdvals(original[name.removeprefix("base_model.model.")])[:4]
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], top, atol=1e-4, rtol=1e-4)


def test_pissa_residual_is_rebuilt_bit_exactly_from_stored_state() -> None:
    cfg = LoRAConfig(rank=4, init="pissa_niter_2")
    first = apply_lora(tiny_model(), cfg)
    initial = pissa_initialize(first, cfg)
    second = apply_lora(tiny_model(), cfg)
    restore_pissa_residual(second, initial)
    for (name, a), (_, b) in zip(lora_layers(first).items(), lora_layers(second).items(), strict=True):
        assert torch.equal(a.get_base_layer().weight, b.get_base_layer().weight), name


def test_pissa_is_seeded() -> None:
    cfg = LoRAConfig(rank=4, init="pissa_niter_1", seed=3)
    a = pissa_initialize(apply_lora(tiny_model(), cfg), cfg)
    b = pissa_initialize(apply_lora(tiny_model(), cfg), cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_restore_rejects_mismatched_state() -> None:
    cfg = LoRAConfig(rank=4, init="pissa_niter_1")
    model = apply_lora(tiny_model(), cfg)
    initial = pissa_initialize(model, cfg)
    initial.pop(next(iter(initial)))
    with pytest.raises(KeyError, match="missing"):
        restore_pissa_residual(apply_lora(tiny_model(), cfg), initial)
