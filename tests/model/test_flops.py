"""FLOP accounting against the reference anchors and the model's own weights."""

import pytest
import torch

from litovis.model.checkpoint import build_ovis
from litovis.model.flops import (
    llm_forward_flops_per_token,
    llm_matmul_params,
    training_flops,
    visual_head_forward_flops_per_atom,
    vit_forward_flops_per_patch,
)
from litovis.model.presets import preset


@pytest.mark.parametrize("name", ["9b", "2b"])
def test_matmul_params_are_the_projection_weights(name: str) -> None:
    config = preset(name)
    llm = build_ovis(config, device="meta").llm
    linear = sum(m.weight.numel() for m in llm.modules() if isinstance(m, torch.nn.Linear))
    if config.llm.tie_word_embeddings:
        linear += llm.model.embed_tokens.weight.numel()  # the tied table is also the output matmul
    assert llm_matmul_params(config.llm) == linear


def test_flops_match_the_performance_anchors() -> None:
    config = preset("9b")
    assert abs(llm_matmul_params(config.llm) / 1e9 - 7.57) < 0.01
    per_token = llm_forward_flops_per_token(config.llm, 2048)
    assert per_token == 2 * llm_matmul_params(config.llm) + 2 * 36 * 32 * 128 * 2048
    matmuls_only = vit_forward_flops_per_patch(config.vit, 0)
    assert abs(matmuls_only / 1e9 - 0.83) < 0.01
    assert vit_forward_flops_per_patch(config.vit, 784) - matmuls_only == 4 * 27 * 1152 * 784
    assert abs(visual_head_forward_flops_per_atom(config) / 1e9 - 1.1) < 0.05


def test_training_flops_of_a_packed_step() -> None:
    config = preset("9b")
    n = llm_matmul_params(config.llm)
    lengths = [1000, 3000]
    attention = 6 * 36 * 32 * 128 * (1000**2 + 3000**2)
    assert training_flops(config, lengths) == 4 * n * 4000 + attention
    assert training_flops(config, lengths, full_llm=True) == 6 * n * 4000 + attention
    patches = 784  # one 448x448 image: 196 atoms
    vision = patches * vit_forward_flops_per_patch(config.vit, 0) + 196 * visual_head_forward_flops_per_atom(config)
    assert training_flops(config, lengths, patches) == pytest.approx(4 * n * 4000 + attention + vision)
    assert training_flops(config, lengths, patches, vision_trains=True) == pytest.approx(4 * n * 4000 + attention + 3 * vision)
