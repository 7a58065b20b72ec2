"""Chunked cross-entropy and DFT over the lm_head, never materialising `[tokens, vocab]` logits.

`token_loss` projects final hidden states onto the vocabulary `chunk_size` target rows at a time,
computes each chunk's loss in float32 and returns the summed loss plus detached per-token CE, DFT
and accuracy for logging. DFT (Wu et al. 2025) is `CE_t · sg(p_t)` = `CE_t · exp(-CE_t).detach()`.

Normalisation rule (the caller's job, the same for CE and DFT): `loss_sum` is a plain sum over
target tokens; the training step divides it by the number of target tokens in all micro-batches
of one optimizer step (under DDP, which averages gradients, by the all-ranks count / world size),
so every target token weighs the same however tokens fall into micro-batches and ranks.

Notable:
- Rows without a target (prompt, visual and padding positions, about half of a multimodal batch)
  are dropped before any matmul, so their cost is one `index_select`.
- Gradient strategy: fused, Liger-style. While a chunk's logits are live, the forward also turns
  them into `dloss/dlogits` and multiplies out `grad_hidden` (and `grad_weight` when the lm_head is
  trainable); backward only scales these by `grad_output`. With the default frozen lm_head that is
  2 vocab-sized matmuls per token instead of 3 for recomputing the logits in backward (3 instead of
  4 when trainable), and no softmax pass is repeated. The cost: gradient work happens whenever grad
  is enabled (validation runs under `no_grad` and skips it), the stored `grad_hidden` is `[targets,
  H]` in the input dtype (the size of the hidden states themselves), a trainable lm_head keeps a
  `[V, H]` gradient from forward to backward, double backward is unsupported, and wrapping the
  loss in activation checkpointing would redo all of it while saving nothing (it keeps no logits).
- Matmuls run in the compute dtype (the autocast dtype under autocast, else the inputs' promoted
  dtype); everything after the matmul is float32. A trainable weight's gradient accumulates over
  chunks in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from litovis.model.tokens import IGNORE_INDEX

LOSS_KINDS = ("ce", "dft")


@dataclass
class TokenLoss:
    """Result of `token_loss`; every per-token field has the layout of `targets` (`[N]`)."""

    loss_sum: Tensor
    """Scalar float32, differentiable: sum over target tokens of the chosen loss (CE including any
    label smoothing, or DFT). Divide by the accumulated batch's target count (see module header)."""
    ce: Tensor
    """`[N]` float32, detached: plain cross-entropy `-log p_t` (no smoothing), 0 where ignored."""
    dft: Tensor
    """`[N]` float32, detached: DFT value `p_t · -log p_t`, 0 where ignored."""
    correct: Tensor
    """`[N]` bool: argmax of the logits equals the target; False where ignored."""
    n_targets: Tensor
    """Scalar long: number of non-ignored targets."""


def shift_targets(labels: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Turn UNSHIFTED labels `[B, T]` into flat targets `[B*T]`: target n is the label of n + 1.

    The last position of each row gets `IGNORE_INDEX`. For a packed row (`B == 1`) pass
    `cu_seqlens` (`[S + 1]` sample boundaries): the last position of every sample is then also
    ignored, so no sample is trained to predict the next sample's first token (which the data
    contract already labels -100; this makes it hold regardless).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        batch, length = labels.shape
        bounds = cu_seqlens.to(device=labels.device, dtype=torch.long)
        if batch != 1:
            raise ValueError(f"cu_seqlens is for packed batches with B == 1, got B = {batch}")
        if bounds.dim() != 1 or bounds.numel() < 2:
            raise ValueError(f"cu_seqlens must be [S + 1] with S >= 1, got {tuple(bounds.shape)}")
        ok = (bounds[0] == 0) & (bounds[-1] == length) & (bounds.diff() >= 0).all()
        if not bool(ok):
            raise ValueError(
                f"cu_seqlens must rise from 0 to T = {length}, got {bounds.tolist()}"
            )
        ends = bounds[1:] - 1
        shifted[0, ends[ends >= 0]] = IGNORE_INDEX
    return shifted.reshape(-1)


def token_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    kind: str = "ce",
    chunk_size: int = 1024,
    label_smoothing: float = 0.0,
) -> TokenLoss:
    """Sum of CE or DFT over target tokens of `hidden @ weight.T`, computed chunk by chunk.

    Args:
        hidden: `[N, H]` final-normed hidden states (any float dtype).
        weight: `[V, H]` lm_head weight, frozen or trainable.
        targets: `[N]` long, already shifted (see `shift_targets`); `IGNORE_INDEX` = no target.
        kind: "ce" (cross-entropy) or "dft" (dynamic fine-tuning).
        chunk_size: target rows per vocabulary projection; peak memory grows with
            `chunk_size · V · 6` bytes.
        label_smoothing: as in `torch.nn.functional.cross_entropy`; CE only.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if kind == "dft" and label_smoothing > 0:
        raise ValueError(
            "label smoothing is defined for the CE loss only and cannot be combined with DFT; "
            "set label_smoothing=0 or kind='ce'"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [{hidden.shape[0]}], got {tuple(targets.shape)}")

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    args = (hidden, weight, targets.long(), kind, label_smoothing, chunk_size, compute_dtype)
    grad_on = torch.is_grad_enabled()
    if grad_on and (hidden.requires_grad or weight.requires_grad):
        loss_sum, ce, dft, correct = _ChunkedTokenLoss.apply(*args)
    else:
        loss_sum, ce, dft, correct, _ = _chunked_forward(
            *args, need_grad_hidden=False, need_grad_weight=False
        )
    n_targets = (targets != IGNORE_INDEX).sum()
    return TokenLoss(loss_sum=loss_sum, ce=ce, dft=dft, correct=correct, n_targets=n_targets)


class _ChunkedTokenLoss(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward, backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, kind, label_smoothing, chunk_size, compute_dtype):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        loss_sum, ce, dft, correct, grads = _chunked_forward(
            hidden, weight, targets, kind, label_smoothing, chunk_size, compute_dtype,
            need_grad_hidden=need_h, need_grad_weight=need_w,
        )
        rows, grad_hidden, grad_weight = grads
        ctx.save_for_backward(rows, grad_hidden, grad_weight)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.mark_non_differentiable(ce, dft, correct)
        return loss_sum, ce, dft, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_unused):
        rows, grad_hidden, grad_weight = ctx.saved_tensors
        out_hidden = out_weight = None
        if grad_hidden is not None:
            out_hidden = grad_hidden.new_zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype)
            out_hidden.index_copy_(0, rows, (grad_hidden * grad_loss).to(ctx.hidden_dtype))
        if grad_weight is not None:
            out_weight = grad_weight * grad_loss
        return out_hidden, out_weight, None, None, None, None, None


def _chunked_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    kind: str,
    label_smoothing: float,
    chunk_size: int,
    compute_dtype: torch.dtype,
    *,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor | None, Tensor | None]]:
    """Loss, per-token stats and (optionally) gradients of `loss_sum` w.r.t. hidden/weight.

    Returns `(loss_sum, ce, dft, correct, (rows, grad_hidden_rows, grad_weight))` where
    `grad_hidden_rows` is `[len(rows), H]` for the target rows only.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    with torch.autocast(device.type, enabled=False), torch.no_grad():
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync: the row count
        row_targets = targets.index_select(0, rows)
        if rows.numel() and bool(((row_targets < 0) | (row_targets >= vocab)).any()):
            bad = row_targets[(row_targets < 0) | (row_targets >= vocab)][:5].tolist()
            raise ValueError(f"targets must be in [0, {vocab}) or {IGNORE_INDEX}; found {bad}")
        row_hidden = hidden.index_select(0, rows).to(compute_dtype)
        w = weight.to(compute_dtype)

        m = rows.numel()
        ce = torch.empty(m, device=device, dtype=torch.float32)
        dft = torch.empty_like(ce)
        correct = torch.empty(m, device=device, dtype=torch.bool)
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        grad_hidden = (
            torch.empty(m, hidden.shape[1], device=device, dtype=hidden.dtype)
            if need_grad_hidden else None
        )
        # float32 accumulation across chunks: a bf16 running sum would round once per chunk.
        grad_weight = (
            torch.zeros(weight.shape, device=device, dtype=torch.float32)
            if need_grad_weight else None
        )
        eps = label_smoothing
        for start in range(0, m, chunk_size):
            part = slice(start, min(start + chunk_size, m))
            h_c, t_c = row_hidden[part], row_targets[part].unsqueeze(1)
            z = (h_c @ w.T).float()  # [c, V]; a fresh buffer, so the in-place ops below are safe
            z_target = z.gather(1, t_c).squeeze(1)
            z_mean = z.mean(1) if eps > 0 else None
            z_max, argmax = z.max(1)
            # z becomes exp(z - max) in place: one [c, V] float32 buffer serves stats and gradient
            z.sub_(z_max.unsqueeze(1)).exp_()
            sum_exp = z.sum(1)
            lse = z_max + sum_exp.log()
            ce_c = lse - z_target
            p_target = torch.exp(-ce_c)
            ce[part], dft[part] = ce_c, ce_c * p_target
            correct[part] = argmax == t_c.squeeze(1)
            if kind == "dft":
                loss_sum += dft[part].sum()
            elif eps > 0:
                loss_sum += ((1 - eps) * ce_c + eps * (lse - z_mean)).sum()
            else:
                loss_sum += ce_c.sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # dloss/dz = scale · (softmax - onehot') with scale = sg(p_t) for DFT, 1 for CE;
            # smoothing makes onehot' = (1 - eps) · onehot + eps / V.
            scale = p_target if kind == "dft" else torch.ones_like(p_target)
            z.mul_((scale / sum_exp).unsqueeze(1))
            z.scatter_add_(1, t_c, -(scale * (1 - eps)).unsqueeze(1))
            if eps > 0:
                z.sub_(eps / vocab)
            dz = z.to(compute_dtype)
            del z
            if grad_hidden is not None:
                grad_hidden[part] = dz @ w
            if grad_weight is not None:
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(dz.T, h_c)
                else:
                    grad_weight += dz.T @ h_c
            del dz

        ce_full = torch.zeros(n, device=device, dtype=torch.float32).index_copy_(0, rows, ce)
        dft_full = torch.zeros_like(ce_full).index_copy_(0, rows, dft)
        correct_full = torch.zeros(n, device=device, dtype=torch.bool).index_copy_(0, rows, correct)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
    return loss_sum, ce_full, dft_full, correct_full, (rows, grad_hidden, grad_weight)
