"""Full-size Ovis2.5 check on one GPU: the training step's forward + backward and predict's generation.

    python bench/model_check.py [--preset 9b] [--image 1344] [--text 512] [--new-tokens 64]
    python bench/model_check.py --small      # the tiny preset on CPU: checks that the script runs

Builds the preset with random weights directly on the device (bf16 on a GPU; no checkpoint
needed) and times the paths `litovis fit` and `litovis predict` run:

- forward + backward of one packed row (`cu_seqlens`, positions from 0) holding one sample of one
  image (`--image` px square) and `--text` text tokens, as `litovis.training.module` computes it:
  `Ovis2_5.forward(head_loss=...)` with the chunked `token_loss` on the hidden states (no logits
  tensor), bf16 autocast, gradient checkpointing, and trainable LLM projections standing in for
  LoRA adapters (the frozen rest gets no gradients);
- `FastGenerator` (packed prefill, then the decode step, CUDA-graph replayed on a GPU) generating
  `--new-tokens` greedy tokens for the same prompt.

Prints time and peak memory of each phase. Not a benchmark of throughput: see
bench/train_step.py and bench/predict.py for those.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from litovis.model.checkpoint import build_ovis
from litovis.model.decoding import EncodedPrompt, FastGenerator
from litovis.model.generation import GenerationConfig
from litovis.model.presets import preset
from litovis.model.tokens import IGNORE_INDEX, IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID
from litovis.training.config import LossConfig
from litovis.training.losses import shift_targets, token_loss

QWEN_TEXT_VOCAB = 151643  # ids below <|endoftext|> are ordinary text tokens


def timed(label: str, fn: Callable[[], Any], device: torch.device) -> Any:
    """Run `fn`, print its wall time (and peak GPU memory on CUDA), return its result."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = f"   peak {torch.cuda.max_memory_allocated(device) / 2**30:6.1f} GiB" if cuda else ""
    print(f"{label:<34} {seconds:8.2f} s{peak}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default 9b; --small: tiny)")
    parser.add_argument("--image", type=int, default=None, help="image side in pixels, a multiple of 32 (default 1344; --small: 64)")
    parser.add_argument("--text", type=int, default=None, help="text tokens around the image (default 512; --small: 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 64; --small: 8)")
    parser.add_argument("--small", action="store_true", help="tiny preset on CPU in float32")
    args = parser.parse_args()

    small = args.small
    device = torch.device("cpu" if small else "cuda")
    if not small and not torch.cuda.is_available():
        raise SystemExit("the full-size check needs CUDA; use --small on CPU")
    name = args.preset or ("tiny" if small else "9b")
    image_side = args.image or (64 if small else 1344)
    text_tokens = args.text or (32 if small else 512)
    new_tokens = args.new_tokens or (8 if small else 64)
    dtype = torch.float32 if small else torch.bfloat16
    config = preset(name)
    vit = config.vit
    if image_side % (vit.patch_size * vit.hidden_stride):
        raise SystemExit(f"--image must be a multiple of {vit.patch_size * vit.hidden_stride}")

    torch.manual_seed(0)
    model = timed(f"build {name} ({str(dtype).removeprefix('torch.')}, random)",
                  lambda: build_ovis(config, dtype, device), device)
    params = model.num_parameters()
    print("parameters:", {k: f"{v / 1e9:.3f} B" if v >= 1e8 else f"{v / 1e6:.3f} M" for k, v in params.items()},
          flush=True)

    side = image_side // vit.patch_size
    atoms = side * side // vit.hidden_stride**2
    half = text_tokens // 2
    vocab = config.llm.vocab_size
    text = lambda n: torch.randint(0, min(vocab, QWEN_TEXT_VOCAB), (n,))  # noqa: E731
    span = torch.tensor([IMAGE_START_ID] + [VISUAL_ATOM_ID] * atoms + [IMAGE_END_ID])
    ids = torch.cat([text(half), span, text(text_tokens - half)])
    pixel_values = torch.randn(side * side, vit.num_channels * vit.patch_size**2)
    grid_thws = torch.tensor([[1, side, side]])
    length = ids.numel()
    print(f"sample: {length} tokens ({atoms} visual atoms, {side * side} patches)", flush=True)

    # Training: one packed row, the answer after the image is the target (as the data layer labels it).
    labels = ids.clone()
    labels[: half + atoms + 2] = IGNORE_INDEX
    cu_seqlens = torch.tensor([0, length], dtype=torch.int32, device=device)
    targets = shift_targets(labels[None].to(device), cu_seqlens)
    chunk_size = LossConfig().chunk_size
    model.requires_grad_(False)
    for param_name, param in model.llm.named_parameters():
        if param_name.endswith("_proj.weight"):
            param.requires_grad_(True)  # stands in for adapters: gradients flow through every layer
    model.llm.set_gradient_checkpointing(True)

    def head_loss(hidden: torch.Tensor, output_weight: torch.Tensor):
        return token_loss(hidden.flatten(0, 1), output_weight, targets, kind="ce", chunk_size=chunk_size)

    def forward_backward() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=ids[None].to(device), pixel_values=pixel_values.to(device, dtype),
                        grid_thws=grid_thws.to(device), position_ids=torch.arange(length, device=device)[None],
                        cu_seqlens=cu_seqlens, max_seqlen=length, head_loss=head_loss)
        result = out.head_loss
        loss = result.loss_sum / result.n_targets.clamp(min=1)
        loss.backward()
        return loss.item()

    loss = timed("forward + backward (token_loss)", forward_backward, device)
    print(f"loss {loss:.3f} (random weights: about ln(vocab) = {math.log(vocab):.3f})", flush=True)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    model.llm.set_gradient_checkpointing(False)
    model.eval()

    # Generation: what predict runs; every row generates exactly `new_tokens` (eos ignored).
    eos = (151645, 151643) if vocab > 151645 else (vocab - 1, vocab - 2)
    gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, eos_token_ids=eos, pad_token_id=eos[1])
    generator = FastGenerator(model, gen)
    prompt = EncodedPrompt(ids, pixel_values.to(dtype), grid_thws)
    timed("generate, first call (+ capture)", lambda: generator.generate([prompt]), device)
    out = timed(f"generate {new_tokens} tokens (FastGenerator)", lambda: generator.generate([prompt]), device)
    print(f"generated {out[0].numel()} tokens", flush=True)


if __name__ == "__main__":
    main()
