"""Benchmark: chunked CE/DFT (`litovis.training.losses.token_loss`) vs full-logit cross-entropy.

Times forward + backward through the lm_head projection and the loss for the 9B's shapes
(H 4096, V 151,936, bf16) and reports the peak memory above the inputs. Run by hand on a GPU:

    PYTHONPATH=src python bench/loss.py                 # N = 8192, 16384 on CUDA
    PYTHONPATH=src python bench/loss.py --small         # tiny shapes; also runs on CPU

"fraction" is the share of positions with a target (a multimodal batch has ~half); the chunked
loss skips the rest before any matmul, the full-logit baseline computes every row as HF does.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from litovis.model.tokens import IGNORE_INDEX
from litovis.training.losses import token_loss


def full_ce(hidden, weight, targets, chunk_size):
    """What HF does: full logits in the input dtype, upcast to float32, one cross-entropy."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked(kind):
    def run(hidden, weight, targets, chunk_size):
        return token_loss(hidden, weight, targets, kind, chunk_size).loss_sum
    run.__name__ = f"chunked_{kind}"
    return run


def measure(method, hidden, weight, targets, chunk_size, repeats):
    """Mean seconds per forward + backward, peak bytes above the inputs, and the loss value."""
    wrt = [t for t in (hidden, weight) if t.requires_grad]
    cuda = hidden.device.type == "cuda"

    def step():
        loss = method(hidden, weight, targets, chunk_size)
        torch.autograd.grad(loss, wrt)
        return loss.detach()

    step()  # warm-up: allocator, kernels
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            loss = step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000 / repeats
        peak = torch.cuda.max_memory_allocated() - base
    else:
        began = time.perf_counter()
        for _ in range(repeats):
            loss = step()
        seconds = (time.perf_counter() - began) / repeats
        peak = None
    return seconds, peak, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU-friendly)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trainable-head", action="store_true", help="lm_head requires grad")
    args = parser.parse_args()

    if args.small:
        tokens, hidden_size, vocab, chunk_size = (512, 1024), 64, 4096, min(args.chunk_size, 128)
    else:
        tokens, hidden_size, vocab, chunk_size = (8192, 16384), 4096, 151936, args.chunk_size
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    methods = [full_ce, chunked("ce"), chunked("dft")]
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen) * 0.02).to(dtype)
    weight.requires_grad_(args.trainable_head)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), {dtype}, H {hidden_size}, V {vocab}, chunk {chunk_size}, "
          f"lm_head {'trainable' if args.trainable_head else 'frozen'}, {args.repeats} repeats")
    header = (f"{'N':>6} {'fraction':>8} {'method':>12} {'ms fwd+bwd':>11} {'peak GiB':>9} "
              f"{'loss/token':>11}")
    print(header)
    print("-" * len(header))
    for n in tokens:
        hidden = torch.randn(n, hidden_size, device=device, generator=gen).to(dtype)
        hidden.requires_grad_()
        for fraction in (1.0, 0.5):
            targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
            targets[torch.rand(n, device=device, generator=gen) >= fraction] = IGNORE_INDEX
            n_targets = int((targets != IGNORE_INDEX).sum())
            for method in methods:
                try:
                    seconds, peak, loss = measure(method, hidden, weight, targets, chunk_size,
                                                  args.repeats)
                except torch.OutOfMemoryError:
                    print(f"{n:>6} {fraction:>8.2f} {method.__name__:>12} {'OOM':>11}")
                    torch.cuda.empty_cache()
                    continue
                peak_text = "n/a" if peak is None else f"{peak / 2**30:.2f}"
                print(f"{n:>6} {fraction:>8.2f} {method.__name__:>12} {seconds * 1e3:>11.1f} "
                      f"{peak_text:>9} {loss / max(n_targets, 1):>11.4f}")


if __name__ == "__main__":
    main()
