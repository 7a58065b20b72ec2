"""Decoding attention split at the slots every row fills: an unmasked kernel there, a mask only after.

In a decode step each row attends over its own prompt and answer so far, so the attention needs
a mask over the cache; but the cache's first slots, up to the batch's shortest prompt, are valid
for every row. Fused kernels run much faster without a mask (cuDNN: about a third less time at
batch 64 on an H200), so the step attends over that shared prefix unmasked, over the few slots
after it with the mask, and merges the two partial results by their log-sum-exp: the same
softmax, up to rounding.

On CUDA the shared part runs cuDNN's kernel (through the private op that also returns the
log-sum-exp); elsewhere, and for the short masked part, two batched matmuls with a float32
softmax.
"""

from __future__ import annotations

import torch


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention `[B, H, Lq, D]` and its float32 log-sum-exp `[B, H, Lq, 1]` (q/k/v `[B, H, L, D]`).

    A query whose keys are all masked gets zeros and a log-sum-exp of float32's lowest value,
    so merging it adds nothing (instead of NaN).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min)
    out = torch.matmul(torch.exp(scores - lse).to(v.dtype), v)
    return out, lse


def _unmasked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention and its log-sum-exp `[B, H, Lq, 1]`: cuDNN on CUDA, matmuls elsewhere."""
    if q.device.type == "cuda" and torch.backends.cudnn.is_available():
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
        return out, lse.reshape(*q.shape[:-1], 1).float()
    return _matmul_attention(q, k, v, None, scale)


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            shared: int, scale: float) -> torch.Tensor:
    """Masked attention of q `[B, H, Lq, D]` over k/v `[B, H, Tk, D]`, where `mask` `[B, 1, Lq, Tk]` is
    True on the first `shared` keys for every query. Returns `[B, H, Lq, D]` in q's dtype."""
    if not 0 < shared < k.shape[2]:
        raise ValueError(f"the shared prefix must be shorter than the {k.shape[2]} keys and not empty, got {shared}")
    out_a, lse_a = _unmasked_attention(q, k[:, :, :shared], v[:, :, :shared], scale)
    out_b, lse_b = _matmul_attention(q, k[:, :, shared:], v[:, :, shared:], mask[..., shared:], scale)
    lse = torch.logaddexp(lse_a, lse_b)
    merged = out_a.float() * torch.exp(lse_a - lse) + out_b.float() * torch.exp(lse_b - lse)
    return merged.to(q.dtype)
