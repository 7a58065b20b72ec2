"""Chunked CE/DFT against full-logit references: values, gradients, logging stats, memory."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
import torch.nn.functional as F

from litovis.model.tokens import IGNORE_INDEX
from litovis.training import losses
from litovis.training.losses import shift_targets, token_loss

N, H, V = 37, 16, 50


def make_inputs(n=N, h=H, v=V, dtype=torch.float32, ignore_every=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen).mul(0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = IGNORE_INDEX
    return hidden, weight, targets


def full_logits(hidden, weight):
    """What an unchunked model would do: matmul in the input dtype, then float32."""
    return (hidden @ weight.T).float()


def reference_loss(hidden, weight, targets, kind, label_smoothing=0.0):
    logits = full_logits(hidden, weight)
    if kind == "ce":
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=label_smoothing)
    keep = targets != IGNORE_INDEX
    log_p = logits[keep].log_softmax(-1).gather(1, targets[keep].unsqueeze(1))
    return -(log_p.exp().detach() * log_p).sum()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 16, 1024])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_ce_equals_full_cross_entropy(chunk_size, label_smoothing):
    hidden, weight, targets = make_inputs()
    targets[10:20] = IGNORE_INDEX  # a run of ignored rows spanning whole chunks
    out = token_loss(hidden, weight, targets, "ce", chunk_size, label_smoothing)
    ref = reference_loss(hidden, weight, targets, "ce", label_smoothing)
    assert out.loss_sum.dtype == torch.float32 and out.loss_sum.shape == ()
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ce", "dft"])
def test_single_target_and_all_ignored(kind):
    hidden, weight, targets = make_inputs()
    one = torch.full_like(targets, IGNORE_INDEX)
    one[11] = 4
    out = token_loss(hidden, weight, one, kind, chunk_size=4)
    torch.testing.assert_close(out.loss_sum, reference_loss(hidden, weight, one, kind))
    assert out.n_targets.item() == 1

    none = torch.full_like(targets, IGNORE_INDEX)
    out = token_loss(hidden, weight, none, kind, chunk_size=4)
    assert out.loss_sum.item() == 0.0 and out.n_targets.item() == 0
    assert not out.correct.any() and not out.ce.any()
    g_hidden, g_weight = grads(out.loss_sum, hidden, weight)
    assert not g_hidden.any() and not g_weight.any()


@pytest.mark.parametrize("chunk_size", [3, 8, 100])
def test_dft_equals_reference_formula(chunk_size):
    hidden, weight, targets = make_inputs()
    out = token_loss(hidden, weight, targets, "dft", chunk_size)
    torch.testing.assert_close(out.loss_sum, reference_loss(hidden, weight, targets, "dft"))


@pytest.mark.parametrize("kind,label_smoothing", [("ce", 0.0), ("ce", 0.2), ("dft", 0.0)])
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_gradients_match_autograd_fp32(kind, label_smoothing, chunk_size):
    hidden, weight, targets = make_inputs()
    out = token_loss(hidden, weight, targets, kind, chunk_size, label_smoothing)
    # a non-unit upstream gradient, as after dividing by the batch's target count
    got = grads(out.loss_sum / 7.0, hidden, weight)
    want = grads(reference_loss(hidden, weight, targets, kind, label_smoothing) / 7.0,
                 hidden, weight)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ce", "dft"])
def test_gradients_match_autograd_bf16(kind):
    hidden, weight, targets = make_inputs(n=64, h=32, v=300, dtype=torch.bfloat16)
    out = token_loss(hidden, weight, targets, kind, chunk_size=16)
    ref = reference_loss(hidden, weight, targets, kind)
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-3, atol=1e-3)
    got = grads(out.loss_sum, hidden, weight)
    want = grads(ref, hidden, weight)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2)


def test_frozen_or_trainable_weight_only():
    hidden, weight, targets = make_inputs()
    frozen = weight.detach()
    out = token_loss(hidden, frozen, targets, "ce", chunk_size=8)
    out.loss_sum.backward()
    ref_h, = grads(reference_loss(hidden, frozen, targets, "ce"), hidden)
    torch.testing.assert_close(hidden.grad, ref_h)

    fixed_hidden = hidden.detach()
    out = token_loss(fixed_hidden, weight, targets, "dft", chunk_size=8)
    out.loss_sum.backward()
    ref_w, = grads(reference_loss(fixed_hidden, weight, targets, "dft"), weight)
    torch.testing.assert_close(weight.grad, ref_w)


def test_per_token_stats_match_full_logits():
    hidden, weight, targets = make_inputs()
    logits = full_logits(hidden, weight).detach()
    keep = targets != IGNORE_INDEX
    hits = keep & (torch.arange(N) % 2 == 0)
    targets[hits] = logits.argmax(-1)[hits]  # so that some tokens are right and some wrong
    out = token_loss(hidden, weight, targets, "ce", chunk_size=6)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.dft, ce * torch.exp(-ce))
    assert torch.equal(out.correct, (logits.argmax(-1) == targets) & keep)
    assert out.n_targets.dtype == torch.long and out.n_targets.item() == keep.sum().item()
    assert out.correct.sum() >= hits.sum() > 0
    for stat in (out.ce, out.dft):
        assert not stat.requires_grad and stat.shape == targets.shape
        assert not stat[~keep].any()


def test_per_token_ce_is_unsmoothed_and_dft_logs_ce():
    hidden, weight, targets = make_inputs()
    plain = token_loss(hidden, weight, targets, "ce")
    smooth = token_loss(hidden, weight, targets, "ce", label_smoothing=0.3)
    dft = token_loss(hidden, weight, targets, "dft")
    torch.testing.assert_close(smooth.ce, plain.ce)
    torch.testing.assert_close(dft.ce, plain.ce)
    torch.testing.assert_close(dft.loss_sum, plain.dft.sum())


def test_no_grad_computes_no_gradients(monkeypatch):
    calls = []
    real = losses._chunked_forward

    def spy(*args, **kwargs):
        calls.append((kwargs["need_grad_hidden"], kwargs["need_grad_weight"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "_chunked_forward", spy)
    hidden, weight, targets = make_inputs()
    with torch.no_grad():
        out = token_loss(hidden, weight, targets, "dft")
    token_loss(hidden.detach(), weight.detach(), targets, "ce")
    token_loss(hidden, weight.detach(), targets, "ce")
    assert calls == [(False, False), (False, False), (True, False)]
    assert not out.loss_sum.requires_grad
    torch.testing.assert_close(out.loss_sum, reference_loss(hidden, weight, targets, "dft"))


def test_autocast_computes_in_autocast_dtype_and_returns_fp32():
    hidden, weight, targets = make_inputs(n=48, h=32, v=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_loss(hidden, weight, targets, "ce", chunk_size=16)
        got = grads(out.loss_sum, hidden, weight)
    assert out.loss_sum.dtype == torch.float32 and out.ce.dtype == torch.float32
    ref = reference_loss(hidden.bfloat16(), weight.bfloat16(), targets, "ce")
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-4, atol=1e-3)
    want = grads(reference_loss(hidden, weight, targets, "ce"), hidden, weight)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32  # gradients come back in the parameters' dtype
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2)


def test_bad_arguments_raise():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match="label smoothing"):
        token_loss(hidden, weight, targets, "dft", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown loss kind 'focal'"):
        token_loss(hidden, weight, targets, "focal")
    bad = targets.clone()
    bad[1] = V
    with pytest.raises(ValueError, match=rf"\[0, {V}\).*\[{V}\]"):
        token_loss(hidden, weight, bad, "ce")
    with pytest.raises(ValueError, match="targets must be"):
        token_loss(hidden, weight, targets[:-1], "ce")
    with pytest.raises(ValueError, match="weight"):
        token_loss(hidden, weight[:, :-1], targets, "ce")


def _peak_cpu_bytes(fn) -> int:
    """Peak bytes allocated on the CPU while `fn` runs, from the profiler's allocator trace.

    With `profile_memory=True` the CPU allocator reports every allocation and free made while
    profiling, each with the running total of those bytes ("Total Allocated"); its maximum is the
    peak working set of `fn` on top of whatever existed before. Exact and deterministic: it counts
    tensor bytes, not RSS, so the OS and allocator caching cannot blur it.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/trace.json"
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    assert totals, "profiler recorded no memory events"
    return max(totals)


def test_chunked_peak_memory_is_far_below_full_logits():
    n, h, v, chunk = 2048, 64, 32768, 256
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = torch.randn(v, h, generator=gen) * 0.02
    targets = torch.randint(0, v, (n,), generator=gen)

    def full():
        F.cross_entropy(full_logits(hidden, weight), targets, reduction="sum").backward()

    def chunked():
        token_loss(hidden, weight, targets, "ce", chunk_size=chunk).loss_sum.backward()

    full_peak, chunked_peak = _peak_cpu_bytes(full), _peak_cpu_bytes(chunked)
    logits_bytes = n * v * 4
    assert full_peak >= logits_bytes  # the measurement sees the full logits at least
    assert chunked_peak < full_peak / 8
    # a handful of chunk-sized float32 buffers plus [N, H]-sized tensors, nothing [N, V]-sized
    assert chunked_peak < 2 * chunk * v * 4 + 4 * n * h * 4


def test_shift_targets_padded_rows():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8, IGNORE_INDEX]])
    want = [5, 6, 7, IGNORE_INDEX, IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]
    assert shift_targets(labels).tolist() == want


def test_shift_targets_packed_never_crosses_samples():
    # three samples of lengths 3, 2, 3; the second breaks the contract (its first label is 9)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 9, 3, IGNORE_INDEX, 4, 5]])
    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    got = shift_targets(labels, cu).tolist()
    assert got == [1, 2, IGNORE_INDEX, 3, IGNORE_INDEX, 4, 5, IGNORE_INDEX]


@pytest.mark.parametrize("cu,batch", [([0, 3, 7], 1), ([1, 8], 1), ([0, 5, 3, 8], 1), ([0, 8], 2)])
def test_shift_targets_rejects_bad_cu_seqlens(cu, batch):
    labels = torch.zeros(batch, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="cu_seqlens"):
        shift_targets(labels, torch.tensor(cu, dtype=torch.int32))
