"""One attention entry point for the ViT (bidirectional, per image) and the LLM (causal).

A forward pass first describes *who may attend to whom* once, as an `AttentionLayout`, then
every layer calls `attend(q, k, v, layout)`. Two layouts exist:

- packed (`packed_layout`): one row `[1, T]` holding several sequences delimited by `cu_seqlens`;
  attention never crosses a boundary. Used by training (causal) and by the ViT (bidirectional,
  one sequence per image or video frame).
- padded (`padded_layout`): a batch `[B, T]` with a 0/1 `attention_mask`; also covers decoding
  against a static KV cache, where queries sit at given cache slots.

Backends (chosen per layout): `"varlen"` runs packed layouts through a variable-length flash kernel on CUDA
(`torch.nn.attention.varlen.varlen_attn` when this torch has it, otherwise flash-attn's
`flash_attn_varlen_func` when installed); `"sdpa"` uses `scaled_dot_product_attention` with a
boolean mask built from the layout (exact on any device, the CPU path). `"auto"` picks varlen when
it can run, else SDPA. Padded layouts always use SDPA (a mask is what they are). Asking
explicitly for a backend that cannot run raises. Bidirectional sequences of host-known lengths
(the ViT's images, `sequences_layout`) take one more route under `"auto"` on CUDA, forward-only:
`"per_sequence"`, one SDPA call per run of equal-length sequences with cuDNN's kernel first
(about 1.4x the varlen flash kernel at the ViT's head_dim 72 on an H200). Decoding layouts (one
query per row over a cache) may also name `"matmul"`: two batched matmuls with a float32
softmax, an alternative to SDPA's fused kernels for that shape, or `"split_kv"`: the Triton
kernel of `litovis.model.split_kv_decoding`, which reads each row's filled slots only (no mask)
and also reads a float8 cache.

Grouped-query attention: K/V keep their own head count where the kernel accepts it
(varlen with `enable_gqa` or flash-attn, SDPA on CPU or without a mask, and single-query decoding,
where the query heads of one group are folded into the query axis); otherwise K/V heads are
repeated.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import litovis.model.split_kv_decoding  # noqa: F401  (registers torch.ops.litovis.split_kv_decode)

BackendName = Literal["auto", "sdpa", "varlen"]
BACKENDS: tuple[str, ...] = get_args(BackendName)


def _find_torch_varlen() -> tuple[Callable | None, frozenset[str]]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _find_flash_attn() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


_TORCH_VARLEN, _TORCH_VARLEN_PARAMS = _find_torch_varlen()
_FLASH_ATTN_VARLEN = _find_flash_attn()


def varlen_kernel_name() -> str | None:
    """Which variable-length kernel this installation offers (`None` when neither exists)."""
    if _TORCH_VARLEN is not None:
        return "torch.nn.attention.varlen.varlen_attn"
    if _FLASH_ATTN_VARLEN is not None:
        return "flash_attn.flash_attn_varlen_func"
    return None


def check_backend_name(name: str) -> None:
    """Raise early on a misspelt backend name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype attention will really run in: autocast's when autocast is on for this device."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn `"auto"`/`"sdpa"`/`"varlen"` into the backend that will run on this device and dtype.

    Raises when `"varlen"` is asked for explicitly but cannot run here.
    """
    check_backend_name(requested)
    dtype = _compute_dtype(device, dtype)
    if requested == "sdpa":
        return "sdpa"
    reasons = []
    if device.type != "cuda":
        reasons.append(f"it needs a CUDA device (got {device.type})")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"it needs float16/bfloat16 tensors (got {dtype})")
    if varlen_kernel_name() is None:
        reasons.append("neither torch.nn.attention.varlen nor flash_attn is installed")
    if not reasons:
        return "varlen"
    if requested == "varlen":
        raise RuntimeError("attention backend 'varlen' is unavailable: " + "; ".join(reasons))
    return "sdpa"


@dataclass(frozen=True)
class AttentionLayout:
    """Who may attend to whom in one forward pass; built once, shared by every layer.

    Exactly one of (`cu_seqlens`, `max_seqlen`) for the varlen backend, or `mask` (or neither,
    for one unmasked sequence) for SDPA, is set.
    """

    causal: bool
    """Queries attend only to keys at earlier or equal positions."""
    backend: str
    """`"varlen"`, `"sdpa"` or `"per_sequence"` (already resolved), or `"matmul"`/`"split_kv"` for single-query decoding."""
    cu_seqlens: torch.Tensor | None = None
    """int32 `[S + 1]` sequence boundaries of a packed row (varlen backend)."""
    max_seqlen: int | None = None
    """Longest sequence of a packed row (varlen backend)."""
    mask: torch.Tensor | None = None
    """bool `[B or 1, 1, Tq, Tk]`, True where a query may attend a key (SDPA backend)."""
    runs: tuple[tuple[int, int, int], ...] = ()
    """`(first position, sequences, length)` of each run of equal-length sequences (per_sequence backend)."""
    key_lengths: torch.Tensor | None = None
    """int32 `[B]`: row b attends its first `key_lengths[b]` keys (split_kv backend)."""
    key_span: int = 0
    """Slots `[0, key_span)` hold every row's keys (split_kv backend)."""
    splits: int = 1
    """Pieces `key_span` is cut into, run in parallel (split_kv backend)."""


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the packed sequence each of the `total` positions belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


def packed_layout(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    total: int,
    *,
    causal: bool,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
) -> AttentionLayout:
    """Layout for one packed row of `total` positions split by `cu_seqlens` (int `[S + 1]`)."""
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    resolved = resolve_backend(backend, device, dtype)
    if resolved == "varlen":
        return AttentionLayout(causal=causal, backend="varlen", cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen))
    if cu_seqlens.numel() == 2:
        # One sequence: no mask at all lets SDPA pick its fastest kernel.
        return AttentionLayout(causal=causal, backend="sdpa")
    seg = segment_ids(cu_seqlens, total)
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask = mask.tril()
    return AttentionLayout(causal=causal, backend="sdpa", mask=mask[None, None])


def sequences_layout(
    lengths: Sequence[int],
    *,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    backward: bool = False,
) -> AttentionLayout:
    """Bidirectional layout of one packed row of consecutive sequences with these (host) lengths.

    `"auto"` on CUDA in half precision gives the `"per_sequence"` backend when no backward will
    follow (`backward`: the attention's inputs require grad; training keeps the varlen kernel,
    whose backward is the one measured and verified in training); otherwise (or for an explicit
    `"varlen"`/`"sdpa"`) this is `packed_layout`'s.
    """
    check_backend_name(backend)
    if not lengths or min(lengths) < 1:
        raise ValueError(f"sequence lengths must be positive, got {list(lengths)}")
    half = _compute_dtype(device, dtype) in (torch.float16, torch.bfloat16)
    if backend == "auto" and device.type == "cuda" and half and not backward:
        runs: list[list[int]] = []
        start = 0
        for length in lengths:
            if runs and runs[-1][2] == length:
                runs[-1][1] += 1
            else:
                runs.append([start, 1, length])
            start += length
        return AttentionLayout(causal=False, backend="per_sequence", runs=tuple(tuple(run) for run in runs))
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    return packed_layout(cu_seqlens, max(lengths), sum(lengths), causal=False, backend=backend,
                         device=device, dtype=dtype)


def padded_layout(
    key_mask: torch.Tensor,
    *,
    causal: bool,
    query_slots: torch.Tensor | None = None,
) -> AttentionLayout:
    """Layout for a padded batch (always SDPA).

    `key_mask` `[B, Tk]` marks real keys (1/True) versus padding or unwritten cache slots.
    `query_slots` `[Tq]` are the key indices the queries sit at (default: all `Tk` positions,
    i.e. no cache). Every query may also attend to its own slot, so a padding query never
    faces an all-masked row (its output is finite and ignored).
    """
    key_mask = key_mask.bool()
    key_slots = torch.arange(key_mask.shape[1], device=key_mask.device)
    if query_slots is None:
        query_slots = key_slots
    allowed = key_mask[:, None, :]
    if causal:
        allowed = allowed & (key_slots[None, None, :] <= query_slots[None, :, None])
    allowed = allowed | (key_slots[None, None, :] == query_slots[None, :, None])
    return AttentionLayout(causal=causal, backend="sdpa", mask=allowed[:, None])


def _repeat_kv(x: torch.Tensor, groups: int, head_axis: int) -> torch.Tensor:
    """Repeat each K/V head `groups` times along `head_axis`."""
    return x if groups == 1 else torch.repeat_interleave(x, groups, dim=head_axis)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """q `[T, Hq, D]`, k/v `[T, Hkv, D]` -> `[T, Hq, D]` through a variable-length flash kernel."""
    cu, max_len = layout.cu_seqlens, layout.max_seqlen
    # Flash kernels are not autocast-aware: bring q, k, v to the one dtype they run in.
    dtype = _compute_dtype(q.device, q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    groups = q.shape[1] // k.shape[1]
    if _TORCH_VARLEN is not None:
        params = _TORCH_VARLEN_PARAMS
        kwargs: dict = {}
        if "is_causal" in params:
            kwargs["is_causal"] = layout.causal
        elif "window_size" in params:
            kwargs["window_size"] = (-1, 0) if layout.causal else (-1, -1)
        elif layout.causal:
            raise RuntimeError("this torch's varlen_attn offers no causal option")
        if "scale" in params:
            kwargs["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise RuntimeError("this torch's varlen_attn offers no scale option")
        if groups > 1 and "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif groups > 1:
            k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)  # [T, H, D]
        return _TORCH_VARLEN(q, k, v, cu, cu, max_len, max_len, **kwargs)
    if _FLASH_ATTN_VARLEN is None:
        raise RuntimeError("attention backend 'varlen' is unavailable: no variable-length kernel installed")
    return _FLASH_ATTN_VARLEN(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=layout.causal)


def sdpa_native_gqa(device: torch.device) -> bool:
    """Whether SDPA's own GQA (`enable_gqa`) is used on `device` (else K/V heads are repeated)."""
    return device.type == "cpu"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """q `[B, Tq, Hq, D]`, k/v `[B, Tk, Hkv, D]` -> `[B, Tq, Hq, D]` through SDPA."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    mask = layout.mask
    if groups > 1 and q.shape[2] == 1 and not (layout.causal and mask is None):
        return _sdpa_single_query(q, k, v, mask, scale).transpose(1, 2)
    # SDPA's own GQA is used on CPU only: on CUDA (torch 2.11) `enable_gqa` fails in some kernels
    # it may pick, with or without a mask. Packed training and prefill take the varlen kernel
    # (native GQA) and decoding folds heads, so repeating K/V here costs little where it matters.
    native_gqa = sdpa_native_gqa(q.device)
    if groups > 1 and not native_gqa:
        k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)  # [B, H, T, D]
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=mask,
        is_causal=layout.causal and mask is None,
        scale=scale,
        enable_gqa=groups > 1 and native_gqa,
    )
    return out.transpose(1, 2)


_SEQUENCE_KERNELS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]


def _per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """q `[T, Hq, D]`, k/v `[T, Hkv, D]` -> `[T, Hq, D]`: bidirectional SDPA over each run of equal-length sequences."""
    covered = sum(count * length for _, count, length in layout.runs)
    if covered != q.shape[0]:
        raise ValueError(f"the layout's sequences cover {covered} positions, the queries {q.shape[0]}")
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not sdpa_native_gqa(q.device):
        k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    outputs = []
    with sdpa_kernel(_SEQUENCE_KERNELS, set_priority=True):
        for start, count, length in layout.runs:
            # [count * length, H, D] -> [count, H, length, D], a view
            q_run, k_run, v_run = (x[start:start + count * length].unflatten(0, (count, length)).transpose(1, 2)
                                   for x in (q, k, v))
            out = F.scaled_dot_product_attention(q_run, k_run, v_run, scale=scale,
                                                 enable_gqa=groups > 1 and sdpa_native_gqa(q.device))
            outputs.append(out.transpose(1, 2).flatten(0, 1))
    # Always a new contiguous tensor, even for one run: a compiled consumer then sees one layout.
    return torch.cat(outputs)


def _sdpa_single_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """One query per row (decoding), q `[B, Hq, 1, D]`, k/v `[B, Hkv, Tk, D]` -> `[B, Hq, 1, D]`.

    The query heads sharing one K/V head are folded into the query axis (`[B, Hkv, G, D]`), so
    each cached K/V head is read once and never repeated: decoding is bound by reading the cache.
    The mask `[B, 1, 1, Tk]` is the same for the folded queries.
    """
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    folded = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, 1, dim)


def _matmul_single_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """Decoding attention as two batched matmuls: q `[B, 1, Hq, D]`, k/v `[B, Tk, Hkv, D]` -> `[B, 1, Hq, D]`.

    Query heads are folded per K/V head as in `_sdpa_single_query`; scores are computed in the
    input dtype (as transformers' eager attention does), softmax in at least float32. K/V laid out
    `[B, Hkv, Tk, D]` in memory (a `RowKVCache`) are read without any copy.
    """
    batch, _, heads, dim = q.shape
    kv_heads = k.shape[2]
    folded = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(folded, k.permute(0, 2, 3, 1))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).reshape(batch, 1, heads, dim)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout,
    scale: float | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of q `[B, Tq, Hq, D]` over k, v `[B, Tk, Hkv, D]`; returns `[B, Tq, Hq, D]`.

    `Hq` must be a multiple of `Hkv` (grouped-query attention). `scale` defaults to `D ** -0.5`.
    The varlen backend needs a packed layout (`B == 1`). K/V of another dtype than q are cast to
    q's, except float8 K/V (e4m3, or its bits as uint8) with their (key, value) scales `[B, Hkv, Tk]`
    (`kv_scales`), which only the split_kv backend reads.
    """
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if layout.backend == "split_kv":
        if q.shape[1] != 1 or layout.key_lengths is None:
            raise ValueError("the split_kv backend serves single-query decoding with key_lengths only")
        key_scales, value_scales = kv_scales if kv_scales is not None else (None, None)
        return torch.ops.litovis.split_kv_decode(q, k.transpose(1, 2), v.transpose(1, 2), layout.key_lengths,
                                                 key_scales, value_scales, scale, layout.key_span, layout.splits)
    if kv_scales is not None:
        raise ValueError(f"quantised keys/values are read by the split_kv backend only, not {layout.backend!r}")
    k, v = k.to(q.dtype), v.to(q.dtype)
    if layout.backend == "matmul":
        if q.shape[1] != 1:
            raise ValueError(f"the matmul backend serves single-query decoding only, got {q.shape[1]} queries per row")
        return _matmul_single_query(q, k, v, layout.mask, scale)
    if layout.backend in ("varlen", "per_sequence"):
        if q.shape[0] != 1:
            raise ValueError(f"the {layout.backend} backend needs a packed batch of one row, got {q.shape[0]} rows")
        run = _varlen if layout.backend == "varlen" else _per_sequence
        return run(q[0], k[0], v[0], layout, scale).unsqueeze(0)
    return _sdpa(q, k, v, layout, scale)
