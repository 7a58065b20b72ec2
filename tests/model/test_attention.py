"""The attention entry point: packed, padded and cached layouts against a plain per-sample loop."""

from __future__ import annotations

import pytest
import torch

from litovis.model import attention
from litovis.model.attention import attend, packed_layout, padded_layout, resolve_backend

CPU = torch.device("cpu")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Textbook softmax attention of one sequence: q `[T, Hq, D]`, k/v `[T, Hkv, D]`."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        length = q.shape[0]
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _qkv(total: int, heads: int = 4, kv_heads: int = 2, dim: int = 8, batch: int = 1):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, total, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, total, kv_heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, total, kv_heads, dim, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.fixture(params=[True, False], ids=["native-gqa", "repeated-kv"])
def gqa_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """SDPA with its own GQA (CPU) or with K/V heads repeated (what CUDA runs), both on CPU."""
    monkeypatch.setattr(attention, "sdpa_native_gqa", lambda device: request.param)
    return request.param


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[5, 3, 7], [9]])
def test_packed_sdpa_equals_per_sample_loop(causal: bool, lengths: list[int], gqa_path: bool) -> None:
    total = sum(lengths)
    q, k, v = _qkv(total)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    layout = packed_layout(cu, max(lengths), total, causal=causal, backend="sdpa", device=CPU, dtype=q.dtype)
    out = attend(q, k, v, layout)[0]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        expected = reference_attention(q[0, start:end], k[0, start:end], v[0, start:end], causal)
        torch.testing.assert_close(out[start:end], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_padded_batch_equals_each_row_alone(causal: bool, gqa_path: bool) -> None:
    q, k, v = _qkv(6, batch=3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out = attend(q, k, v, padded_layout(mask, causal=causal))
    assert torch.isfinite(out).all()
    for row in range(3):
        real = mask[row].bool()
        expected = reference_attention(q[row, real], k[row, real], v[row, real], causal)
        torch.testing.assert_close(out[row, real], expected, rtol=1e-10, atol=1e-10)


def test_cached_queries_see_only_valid_earlier_slots() -> None:
    q, k, v = _qkv(8, batch=2)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    slots = torch.tensor([4, 5])  # two new queries written at slots 4 and 5
    layout = padded_layout(valid, causal=True, query_slots=slots)
    out = attend(q[:, :2], k, v, layout)
    for row in range(2):
        for i, slot in enumerate(slots.tolist()):
            keys = valid[row].clone()
            keys[slot + 1:] = False
            expected = reference_attention(q[row, i:i + 1], k[row, keys], v[row, keys], causal=False)
            torch.testing.assert_close(out[row, i:i + 1], expected, rtol=1e-10, atol=1e-10)


def test_unequal_heads_must_divide() -> None:
    q, k, v = _qkv(4, heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="multiple"):
        attend(q, k, v, padded_layout(torch.ones(1, 4), causal=True))


def test_backend_resolution_on_cpu() -> None:
    assert resolve_backend("auto", CPU, torch.bfloat16) == "sdpa"
    assert resolve_backend("sdpa", CPU, torch.float32) == "sdpa"
    with pytest.raises(RuntimeError, match="varlen.*CUDA"):
        resolve_backend("varlen", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", CPU, torch.float32)


def test_varlen_layout_refuses_padded_batches() -> None:
    layout = attention.AttentionLayout(causal=True, backend="varlen", cu_seqlens=torch.tensor([0, 4]), max_seqlen=4)
    q, k, v = _qkv(4, batch=2)
    with pytest.raises(ValueError, match="one row"):
        attend(q, k, v, layout)


@pytest.mark.skipif(not torch.cuda.is_available() or attention.varlen_kernel_name() is None,
                    reason="needs CUDA and a variable-length attention kernel")
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_equals_sdpa_on_gpu(causal: bool) -> None:
    lengths = [37, 5, 90]
    total = sum(lengths)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv(total, heads=8, kv_heads=2, dim=64))
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0)
    device = torch.device("cuda")
    fast = attend(q, k, v, packed_layout(cu, 90, total, causal=causal, backend="varlen", device=device, dtype=q.dtype))
    exact = attend(q, k, v, packed_layout(cu, 90, total, causal=causal, backend="sdpa", device=device, dtype=q.dtype))
    torch.testing.assert_close(fast, exact, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_single_query_decoding_equals_repeated_heads(kv_heads: int, backend: str) -> None:
    """One query per row over a cache: the folded GQA paths equal attention with K/V repeated."""
    q, k, v = _qkv(7, heads=4, kv_heads=kv_heads, batch=3)
    # keys stored heads-first, as a RowKVCache holds them, and seen through a transposed view
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    valid = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    layout = attention.AttentionLayout(causal=True, backend=backend, mask=valid[:, None, None, :])
    out = attend(q[:, :1], k, v, layout)
    for row in range(3):
        keys = valid[row]
        expected = reference_attention(q[row, :1], k[row, keys], v[row, keys], causal=False)
        torch.testing.assert_close(out[row], expected, rtol=1e-10, atol=1e-10)


def test_matmul_backend_takes_one_query_per_row() -> None:
    q, k, v = _qkv(5, batch=2)
    layout = attention.AttentionLayout(causal=True, backend="matmul", mask=None)
    with pytest.raises(ValueError, match="single-query"):
        attend(q[:, :2], k, v, layout)


@pytest.mark.parametrize("lengths", [[4, 4, 6, 3, 3], [9]])
def test_per_sequence_equals_per_sample_loop(lengths: list[int], gqa_path: bool) -> None:
    """One SDPA call per run of equal lengths: each sequence attends to itself only, both ways."""
    total = sum(lengths)
    q, k, v = _qkv(total)
    # the runs CUDA would use (building the layout makes no tensor), run here on CPU
    layout = attention.sequences_layout(lengths, backend="auto", device=torch.device("cuda"), dtype=torch.bfloat16)
    out = attend(q, k, v, layout)[0]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        expected = reference_attention(q[0, start:end], k[0, start:end], v[0, start:end], causal=False)
        torch.testing.assert_close(out[start:end], expected, rtol=1e-10, atol=1e-10)


def test_per_sequence_layout_must_cover_the_queries() -> None:
    q, k, v = _qkv(7)
    layout = attention.AttentionLayout(causal=False, backend="per_sequence", runs=((0, 2, 3),))
    with pytest.raises(ValueError, match="cover 6 positions, the queries 7"):
        attend(q, k, v, layout)


def test_sequences_layout_routes() -> None:
    """`auto` on CUDA in half precision groups equal lengths into runs (no tensor is made, so this
    runs without a GPU); elsewhere, or when a backend is named, it is the packed layout."""
    cuda = torch.device("cuda")
    layout = attention.sequences_layout([3, 3, 5, 3], backend="auto", device=cuda, dtype=torch.bfloat16)
    assert layout.backend == "per_sequence"
    assert layout.runs == ((0, 2, 3), (6, 1, 5), (11, 1, 3))
    on_cpu = attention.sequences_layout([3, 3, 5], backend="auto", device=CPU, dtype=torch.bfloat16)
    named = attention.sequences_layout([3, 3, 5], backend="sdpa", device=CPU, dtype=torch.float32)
    for layout in (on_cpu, named):
        assert layout.backend == "sdpa" and not layout.causal
        assert layout.mask is not None and layout.mask.sum() == 3 * 3 + 3 * 3 + 5 * 5
    with pytest.raises(ValueError, match="positive"):
        attention.sequences_layout([3, 0], backend="auto", device=CPU, dtype=torch.float32)


def test_a_vit_that_trains_keeps_the_packed_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a backward to follow, `auto` on CUDA goes to `packed_layout` (varlen), not per_sequence."""
    calls = []
    monkeypatch.setattr(attention, "packed_layout", lambda *args, **kwargs: calls.append(kwargs) or "packed")
    cuda = torch.device("cuda")
    assert attention.sequences_layout([4, 4], backend="auto", device=cuda, dtype=torch.bfloat16, backward=True) == "packed"
    assert calls and calls[0]["causal"] is False and calls[0]["backend"] == "auto"
    assert attention.sequences_layout([4, 4], backend="auto", device=cuda, dtype=torch.bfloat16).backend == "per_sequence"


@pytest.mark.skipif(not torch.cuda.is_available() or attention.varlen_kernel_name() is None,
                    reason="needs CUDA and a variable-length attention kernel")
def test_per_sequence_equals_varlen_on_gpu() -> None:
    lengths = [64, 64, 40, 64]
    total = sum(lengths)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv(total, heads=4, kv_heads=4, dim=72))
    device = torch.device("cuda")
    fast = attend(q, k, v, attention.sequences_layout(lengths, backend="auto", device=device, dtype=q.dtype))
    varlen = attend(q, k, v, attention.sequences_layout(lengths, backend="varlen", device=device, dtype=q.dtype))
    torch.testing.assert_close(fast, varlen, rtol=2e-2, atol=2e-2)
