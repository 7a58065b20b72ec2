"""Decode-step attention over a per-row KV cache, split along the cache (flash-decoding), in Triton.

A decode step has one query per row, and its attention is bound by reading the cache: at batch
128 with 2,000 cached positions the keys and values of one layer are 1 GB. This kernel reads
each cached K/V head once for all the query heads of its group (grouped-query attention) and
only the slots a row has filled (`key_lengths`), with no mask tensor. The cache axis is cut into
`splits` pieces that run as separate programs, so a few long rows still fill the GPU; each
piece keeps a running softmax (max, sum) and a second small kernel merges the pieces by their
log-sum-exp. Row b attends its slots `[0, key_lengths[b])`: the `RowKVCache` layout, where row
b's token at position p sits in slot p.

Keys/values may also be float8 (e4m3) with one float32 scale per (row, head, slot): the kernel
multiplies scores by the key scales and probabilities by the value scales, in float32, and runs
its dots in float16 (`f16_dots`).

Needs Triton and a CUDA device (`split_kv_available`); the registered op
`torch.ops.litovis.split_kv_decode` is opaque to `torch.compile`, so compiled decoder layers call
it as one node, and its launches are captured by CUDA graphs like any kernel.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the kernel is simply unavailable
    triton = None

DEFAULT_BLOCK = 128
"""Cache slots per inner-loop block (128 beat 64 at batch 64 and 128 on an H100, float8 most: bench/RESULTS.md)."""
MIN_SPLIT = 256
"""Fewest cache slots per split: shorter pieces cost more in merging than they gain in parallelism."""


def split_kv_available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: Triton installed, and a CUDA device or Triton's CPU
    interpreter (`TRITON_INTERPRET=1` before import, how the tests run it without a GPU)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def choose_splits(rows: int, kv_heads: int, slots: int, multiprocessors: int) -> int:
    """Pieces per (row, K/V head): enough programs for about two per multiprocessor, none under `MIN_SPLIT` slots.

    (At batch 64 on an H100, 512 programs of whole rows beat 1,024 half rows.)"""
    wanted = math.ceil(2 * multiprocessors / max(rows * kv_heads, 1))
    return max(1, min(wanted, slots // MIN_SPLIT))


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, KScale, VScale, Lengths, Out, Lse,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                      stride_sb, stride_sh, stride_ob, stride_oh, split_len, scale_log2,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK: tl.constexpr, SPLITS: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr,
                      F16_DOTS: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(Lengths + row)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None],
                    other=0.0)
        if F16_DOTS:  # q pre-scaled, so no score overflows float16's range
            q = (q.to(tl.float32) * scale_log2).to(tl.float16)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_base = K + row * stride_kb + kv_head * stride_kh
        v_base = V + row * stride_vb + kv_head * stride_vh
        for first in range(start, end, BLOCK):
            n = first + tl.arange(0, BLOCK)
            valid = n < end
            k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
            if SCALED:
                s = s * tl.load(KScale + row * stride_sb + kv_head * stride_sh + n, mask=valid, other=0.0)[None, :]
            if not F16_DOTS:
                s = s * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=valid[:, None], other=0.0)
            if SCALED:
                p = p * tl.load(VScale + row * stride_sb + kv_head * stride_sh + n, mask=valid, other=0.0)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
            m_i = m_new
        filled = l_i > 0
        out = acc / tl.where(filled, l_i, 1.0)[:, None]
        if SPLITS == 1:
            tl.store(Out + row * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                     mask=(g < GROUP)[:, None])
        else:
            # partials [B, Hq, SPLITS, D] float32, log-sum-exps [B, Hq, SPLITS] (base 2), contiguous
            slot = (row * (GROUP * tl.num_programs(1)) + heads) * SPLITS + split
            tl.store(Out + slot[:, None] * HEAD_DIM + d[None, :], out, mask=(g < GROUP)[:, None])
            tl.store(Lse + slot, tl.where(filled, m_i + tl.math.log2(tl.where(filled, l_i, 1.0)), float("-inf")),
                     mask=g < GROUP)

    @triton.jit
    def _merge_kernel(Partial, Lse, Out, stride_ob, stride_oh, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
        pair = tl.program_id(0)  # row * HEADS + head
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        lse = tl.load(Lse + pair * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
        weight = tl.math.exp2(lse - tl.max(lse, 0))
        part = tl.load(Partial + (pair * SPLITS + s)[:, None] * HEAD_DIM + d[None, :], mask=(s < SPLITS)[:, None],
                       other=0.0)
        out = tl.sum(weight[:, None] * part, 0) / tl.sum(weight, 0)
        row = pair // HEADS
        head = pair % HEADS
        tl.store(Out + row * stride_ob + head * stride_oh + d, out.to(Out.dtype.element_ty))


@torch.library.custom_op("litovis::split_kv_decode", mutates_args=())
def split_kv_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor,
                    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, scale: float, span: int, splits: int,
                    block: int = DEFAULT_BLOCK, warps: int = 4, f16_dots: bool = True) -> torch.Tensor:
    """Attention of q `[B, 1, Hq, D]` over row b's first `key_lengths[b]` slots of k, v `[B, Hkv, S, D]`.

    k, v are a `RowKVCache` layer's buffers as they are (any strides with a contiguous last axis;
    pass whole buffers rather than slices of them: under `torch.compile` a slice with gaps is
    copied into a dense tensor first, which costs more than the attention). `k_scale`/`v_scale`
    `[B, Hkv, S]` (float32, last axis contiguous) come with float8 e4m3 keys/values (or their
    bits as uint8, how `RowKVCache` stores them) and are None otherwise. Every `key_lengths[b]`
    must be in `[1, span]`, `span <= S`: the slots `[0, span)` are cut into `splits` pieces.
    `splits`, `block` (slots per inner step) and `warps` (per program) change the speed only.
    `f16_dots`: with float8 keys/values and a half-precision q, the dots run in float16 (q
    pre-scaled by the softmax scale) rather than in q's dtype, because widening float8 to float16
    is cheaper (205 against 237 µs per 9B layer at batch 128 on an H100). Returns `[B, 1, Hq, D]`
    in q's dtype.
    """
    batch, _, heads, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    if not split_kv_available(q.device):
        raise RuntimeError("split_kv_decode needs Triton and a CUDA device")
    if heads % kv_heads or dim & (dim - 1) or dim < 16:
        raise ValueError(f"split_kv_decode needs query heads a multiple of K/V heads and a power-of-two head_dim "
                         f">= 16, got {heads} / {kv_heads} heads of {dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("split_kv_decode needs q, k, v with a contiguous last axis")
    if not 1 <= span <= slots:
        raise ValueError(f"span must be in [1, {slots}] (the cache's slots), got {span}")
    scaled = k_scale is not None
    if scaled != (v_scale is not None):
        raise ValueError("k_scale and v_scale go together")
    if k.dtype == torch.uint8:  # float8 bits: a view here is free (the op is opaque to torch.compile)
        k, v = k.view(torch.float8_e4m3fn), v.view(torch.float8_e4m3fn)
    group = heads // kv_heads
    out = torch.empty_like(q)
    split_len = triton.cdiv(triton.cdiv(span, splits), block) * block
    splits = triton.cdiv(span, split_len)
    partial = lse = out
    if splits > 1:
        partial = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    k_scale = k_scale if scaled else key_lengths
    v_scale = v_scale if scaled else key_lengths
    scale_strides = (k_scale.stride(0), k_scale.stride(1)) if scaled else (0, 0)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else nullcontext():
        _split_kernel[(batch, kv_heads, splits)](
            q, k, v, k_scale, v_scale, key_lengths, out if splits == 1 else partial, lse,
            q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            *scale_strides, out.stride(0), out.stride(2), split_len, scale * math.log2(math.e),
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK=block,
            SPLITS=splits, SCALED=scaled, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            F16_DOTS=scaled and f16_dots and q.dtype != torch.float32, num_warps=warps)
        if splits > 1:
            _merge_kernel[(batch * heads,)](partial, lse, out, out.stride(0), out.stride(2), HEADS=heads,
                                            HEAD_DIM=dim, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits))
    return out


@split_kv_decode.register_fake
def _(q, k, v, key_lengths, k_scale, v_scale, scale, span, splits, block=DEFAULT_BLOCK, warps=4, f16_dots=True):
    return torch.empty_like(q)
