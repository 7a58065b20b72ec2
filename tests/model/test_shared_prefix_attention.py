"""Decoding attention split at the shared prefix equals the masked attention it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from litovis.model.shared_prefix_attention import shared_prefix_attention


def _inputs(device: str, dtype: torch.dtype, batch: int = 5, keys: int = 24):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, 2, 3, 16, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, 2, keys, 16, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch, 2, keys, 16, device=device, dtype=dtype, generator=gen)
    valid = torch.tensor([8, 13, 24, 9, 8], device=device)[:batch]  # every row fills the first 8 keys
    mask = (torch.arange(keys, device=device)[None] < valid[:, None])[:, None, None]
    return q, k, v, mask


def test_the_split_equals_the_masked_attention() -> None:
    q, k, v, mask = _inputs("cpu", torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    for shared in (1, 5, 8):
        torch.testing.assert_close(shared_prefix_attention(q, k, v, mask, shared, 0.3), expected)


def test_a_row_with_nothing_after_the_prefix_attends_the_prefix_only() -> None:
    q, k, v, mask = _inputs("cpu", torch.float64)
    out = shared_prefix_attention(q, k, v, mask, 8, 0.3)
    alone = F.scaled_dot_product_attention(q[:1], k[:1, :, :8], v[:1, :, :8], scale=0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], alone)


@pytest.mark.parametrize("shared", [0, 24])
def test_a_prefix_that_is_empty_or_everything_raises(shared: int) -> None:
    q, k, v, mask = _inputs("cpu", torch.float64)
    with pytest.raises(ValueError, match="shared prefix"):
        shared_prefix_attention(q, k, v, mask, shared, 0.3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_kernel_split_equals_the_masked_attention() -> None:
    q, k, v, mask = _inputs("cuda", torch.bfloat16, keys=512)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.25)
    out = shared_prefix_attention(q, k, v, mask, 8, 0.25)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
