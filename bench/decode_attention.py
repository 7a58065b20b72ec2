"""Benchmark: one decode step's attention over a 9B-shaped KV cache, per layer, by kernel.

Shapes of the 9B's LLM (32 query heads, 8 K/V heads, head_dim 128) over a `RowKVCache` layer
(`[B, 8, S, 128]`; SDPA reads a prefix view of `--slots` slots, split_kv the whole buffer with that
span, as decoding passes them): every row has filled `--filled` slots, as after a 1,940-token prompt. Times SDPA with the decode mask (what
`decode_attention: sdpa` runs) and the split-KV Triton kernel (`litovis.model.split_kv_decoding`)
over a grid of block sizes and splits, in bf16 and over a float8 cache (its dots in float16, and
in bfloat16: `f16_dots=False`); prints µs per layer and
the cache bytes read per second ("b64 s2* w4": 64 slots per block, 2 splits, the number
`choose_splits` picks, 4 warps). Run by hand on a GPU:

    PYTHONPATH=src python bench/decode_attention.py --batch-sizes 64,128
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from functools import partial

import torch
import triton.testing

from litovis.model.attention import AttentionLayout, attend
from litovis.model.fp8_prefill import quantize_rows
from litovis.model.split_kv_decoding import choose_splits, split_kv_decode

HEADS, KV_HEADS, DIM = 32, 8, 128


def report(name: str, batch: int, fn: Callable[[], torch.Tensor], read: int, expected: torch.Tensor) -> None:
    """Print fn's time per call, the bytes it reads per second and its largest error."""
    err = (fn().float() - expected).abs().max().item()
    ms = triton.testing.do_bench(fn, warmup=25, rep=200)
    print(f"{name:<34} {batch:>5} {ms * 1000:>9.1f} {read / ms / 1e6:>7.0f} {err:>8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="64,128")
    parser.add_argument("--slots", type=int, default=2048, help="attended cache slots (a prefix of the cache)")
    parser.add_argument("--filled", type=int, default=2004, help="slots each row has filled")
    parser.add_argument("--blocks", default="32,64,128")
    parser.add_argument("--splits", default="1,2,4")
    parser.add_argument("--warps", default="4,8")
    args = parser.parse_args()
    device = torch.device("cuda")
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"cache: {args.slots} attended slots of {args.slots + 256}, {args.filled} filled per row\n")
    print(f"{'kernel':<34} {'batch':>5} {'µs/layer':>9} {'GB/s':>7} {'max err':>8}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        gen = torch.Generator(device=device).manual_seed(batch)
        shape = (batch, KV_HEADS, args.slots + 256, DIM)
        keys = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
        values = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
        k, v = keys[:, :, :args.slots].transpose(1, 2), values[:, :, :args.slots].transpose(1, 2)
        q = torch.randn(batch, 1, HEADS, DIM, device=device, dtype=torch.bfloat16, generator=gen)
        lengths = torch.full((batch,), args.filled, dtype=torch.int32, device=device)
        slot_ids = torch.arange(args.slots, device=device)
        mask = (slot_ids[None, :] < lengths[:, None])[:, None, None, :]
        sdpa = AttentionLayout(causal=True, backend="sdpa", mask=mask)
        expected = attend(q, k, v, sdpa).float()
        bf16_bytes = 2 * batch * KV_HEADS * args.filled * DIM * 2

        report("sdpa (masked, folded heads)", batch, partial(attend, q, k, v, sdpa), bf16_bytes, expected)
        (k8, k_scale), (v8, v_scale) = quantize_rows(keys), quantize_rows(values)
        fp8_args = (k8, v8, lengths, k_scale[..., 0], v_scale[..., 0])
        fp8_bytes = bf16_bytes // 2 + 2 * batch * KV_HEADS * args.filled * 4
        chosen = choose_splits(batch, KV_HEADS, args.slots, processors)
        grid = itertools.product(*(map(int, text.split(",")) for text in (args.blocks, args.splits, args.warps)))
        for block, splits, warps in grid:
            tag = f"b{block} s{splits}{'*' if splits == chosen else ''} w{warps}"
            settings = (DIM ** -0.5, args.slots, splits, block, warps)
            report(f"split_kv {tag}", batch, partial(split_kv_decode, q, keys, values, lengths, None, None, *settings),
                   bf16_bytes, expected)
            report(f"split_kv fp8 {tag}", batch, partial(split_kv_decode, q, *fp8_args, *settings), fp8_bytes,
                   expected)
            report(f"split_kv fp8, bf16 dots {tag}", batch,
                   partial(split_kv_decode, q, *fp8_args, *settings, f16_dots=False), fp8_bytes, expected)
        print()


if __name__ == "__main__":
    main()
