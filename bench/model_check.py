"""Full-size Ovis2.5 check on one GPU: forward + backward and generation with random bf16 weights.

    python bench/model_check.py [--preset 9b] [--image 1344] [--text 512] [--new-tokens 64]

Builds the preset directly on the GPU (no checkpoint needed), runs one forward + backward over a
sample of one image (`--image` px square) and `--text` text tokens with LoRA-like trainable LLM
projections (the frozen rest gets no gradients), then greedy-generates `--new-tokens` tokens for the
same prompt. Prints time and peak memory of each phase. Not a benchmark of throughput: see
bench/train_step.py and bench/predict.py for those.
"""

from __future__ import annotations

import argparse
import time

import torch

from litovis.model.checkpoint import build_ovis
from litovis.model.generation import GenerationConfig
from litovis.model.presets import preset
from litovis.model.tokens import IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID


def timed(label: str, fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{label:<28} {seconds:8.2f} s   peak {peak:6.1f} GiB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="9b")
    parser.add_argument("--image", type=int, default=1344, help="image side in pixels (multiple of 32)")
    parser.add_argument("--text", type=int, default=512, help="text tokens around the image")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    device = torch.device("cuda")
    config = preset(args.preset)
    torch.manual_seed(0)
    model = timed(f"build {args.preset} (bf16, random)", lambda: build_ovis(config, torch.bfloat16, device))
    params = model.num_parameters()
    print("parameters:", {k: f"{v / 1e9:.3f} B" for k, v in params.items()}, flush=True)

    side = args.image // config.vit.patch_size
    atoms = side * side // config.vit.hidden_stride**2
    half = args.text // 2
    text = lambda n: torch.randint(0, 150000, (n,))  # noqa: E731
    ids = torch.cat([text(half), torch.tensor([IMAGE_START_ID] + [VISUAL_ATOM_ID] * atoms + [IMAGE_END_ID]), text(args.text - half)])
    input_ids = ids[None].to(device)
    pixel_values = torch.randn(side * side, 768, device=device)
    grid_thws = torch.tensor([[1, side, side]], device=device)
    labels = input_ids.clone()
    labels[:, : half + atoms + 2] = -100
    print(f"sample: {input_ids.shape[1]} tokens ({atoms} visual atoms, {side * side} patches)", flush=True)

    model.requires_grad_(False)
    for name, param in model.llm.named_parameters():
        if name.endswith("_proj.weight"):
            param.requires_grad_(True)  # stands in for adapters: gradients flow through every layer
    model.llm.set_gradient_checkpointing(True)

    def forward_backward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=input_ids, pixel_values=pixel_values, grid_thws=grid_thws, labels=labels)
        out.loss.backward()
        return out.loss.item()

    loss = timed("forward + backward", forward_backward)
    print(f"loss {loss:.3f} (random weights: about ln(vocab) = {torch.log(torch.tensor(151936.0)):.3f})", flush=True)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)

    gen = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    out = timed(
        f"generate {args.new_tokens} tokens (eager)",
        lambda: model.generate(input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                               grid_thws=grid_thws, config=gen),
    )
    print(f"generated shape {tuple(out.shape)}", flush=True)


if __name__ == "__main__":
    main()
