"""SigLIP2-NaViT and the visual tokenizer against the official outputs and their defining properties."""

from __future__ import annotations

import copy

import pytest
import torch

from litovis.model.ovis import Ovis2_5
from litovis.model.vision import block_order_grid


def test_block_order_lists_each_2x2_block_consecutively() -> None:
    rows, cols = block_order_grid(4, 6, 2)
    pairs = list(zip(rows.tolist(), cols.tolist(), strict=True))
    assert pairs[:8] == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert pairs[12:16] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert sorted(pairs) == [(r, c) for r in range(4) for c in range(6)]


def test_block_order_rejects_odd_grids() -> None:
    with pytest.raises(ValueError, match="hidden_stride"):
        block_order_grid(3, 4, 2)


def test_visual_tokens_equal_the_official_implementation(reference_model: Ovis2_5, expected: dict) -> None:
    with torch.no_grad():
        tokens = reference_model.visual_tokens(expected["pixel_values"], expected["grid_thws"])
    assert tokens.shape == expected["visual_tokens"].shape
    assert (tokens - expected["visual_tokens"]).abs().max() < 1e-5


def test_visual_tokens_are_distributions_with_zero_indicator_columns(reference_model: Ovis2_5, expected: dict) -> None:
    with torch.no_grad():
        tokens = reference_model.visual_tokens(expected["pixel_values"], expected["grid_thws"])
    torch.testing.assert_close(tokens.sum(-1), torch.ones(tokens.shape[0]))
    assert torch.equal(tokens[:, -4:], torch.zeros(tokens.shape[0], 4))


def test_each_image_is_encoded_independently(reference_model: Ovis2_5, expected: dict) -> None:
    pixels, grids = expected["pixel_values"], expected["grid_thws"]
    with torch.no_grad():
        together = reference_model.visual_tokens(pixels, grids)
        start_patch, start_atom = 0, 0
        for grid in grids:
            patches = int(grid.prod())
            alone = reference_model.visual_tokens(pixels[start_patch:start_patch + patches], grid[None])
            torch.testing.assert_close(together[start_atom:start_atom + patches // 4], alone, rtol=1e-6, atol=1e-7)
            start_patch += patches
            start_atom += patches // 4


def test_post_layernorm_is_not_applied(reference_model: Ovis2_5, expected: dict) -> None:
    model = copy.deepcopy(reference_model)
    with torch.no_grad():
        before = model.visual_tokens(expected["pixel_values"], expected["grid_thws"])
        model.visual_tokenizer.vit.vision_model.post_layernorm.weight.mul_(3.0).add_(1.0)
        after = model.visual_tokens(expected["pixel_values"], expected["grid_thws"])
    assert torch.equal(before, after)


def test_position_table_at_native_size_is_read_in_block_order(reference_model: Ovis2_5) -> None:
    embeddings = reference_model.visual_tokenizer.vit.vision_model.embeddings
    table = embeddings.position_embedding.weight  # 16 rows = a 4x4 grid for the tiny model
    with torch.no_grad():
        positions = embeddings.positions([(2, 4, 4)], torch.float32)
    rows, cols = block_order_grid(4, 4, 2)
    one_frame = table[rows * 4 + cols]
    torch.testing.assert_close(positions, torch.cat([one_frame, one_frame]), rtol=1e-6, atol=1e-6)


def test_pixel_rows_must_match_the_grids(reference_model: Ovis2_5, expected: dict) -> None:
    with pytest.raises(ValueError, match="pixel_values has shape"):
        reference_model.visual_tokens(expected["pixel_values"][:-4], expected["grid_thws"])


def test_compiled_encoder_layers_share_graphs_across_layers_and_image_sizes(reference_model: Ovis2_5) -> None:
    """Compiled layers keep the attention (and its per-image layout) out of their graphs: after two
    sizes, images of new sizes and other layers reuse the graphs instead of recompiling."""
    from litovis.model.attention import sequences_layout
    from litovis.model.vision import vision_rotary

    vit = reference_model.visual_tokenizer.vit.vision_model
    eager = copy.deepcopy(vit.encoder.layers)
    layers = copy.deepcopy(vit.encoder.layers)
    torch._dynamo.reset()
    for layer in layers:
        layer.compile(backend="eager")
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(0)
    layouts = ([(1, 4, 4), (1, 4, 4)], [(1, 2, 6)], [(1, 6, 6), (1, 2, 2), (1, 2, 2)], [(2, 4, 2)], [(1, 8, 2)])
    try:
        for index, grids in enumerate(layouts):
            if index == 2:  # the first two sizes warm up (the second makes the token count dynamic)
                warm_up = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                torch._dynamo.utils.counters.clear()
            lengths = [h * w for t, h, w in grids for _ in range(t)]
            # the layout CUDA would use (building it makes no tensor), run here on CPU
            layout = sequences_layout(lengths, backend="auto", device=torch.device("cuda"), dtype=torch.bfloat16)
            hidden = expected = torch.randn(sum(lengths), vit.config.hidden_size, generator=gen)
            cos, sin = vision_rotary(grids, vit.config.head_dim, vit.config.hidden_stride, hidden.device)
            with torch.no_grad():
                for layer, reference in zip(layers, eager, strict=True):
                    hidden, expected = layer(hidden, cos, sin, layout), reference(expected, cos, sin, layout)
            torch.testing.assert_close(hidden, expected)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert 0 < warm_up <= 4, f"{warm_up} graphs for {len(layers)} layers: one per layer, not shared"
    assert graphs == 0, f"{graphs} graphs compiled for new image sizes after the warm-up"
