"""Benchmark: litovis' fast generator vs transformers' `generate`, on test-set-shaped prompts.

Builds the 9B preset with random bf16 weights, synthesises prompts shaped like the test set
(`--prompt-tokens` each; every other row holds one `--image-side`² image, 1280² = 1,600 visual
atoms, the rest of the row is text), forces `--new-tokens` new tokens (eos masked, greedy) and
times a few batches per batch size after one warm-up batch (CUDA-graph capture, compile). Then,
in the same process, transformers' `Qwen3ForCausalLM` built from the same LLM config and sharing
OUR LLM's weights (equal compute; bench/transformers_generate.py) runs `generate(do_sample=False,
max_new_tokens=N, min_new_tokens=N)` with SDPA on text-only prompts of the same length at the
same batch sizes;
our generator also runs that text-only batch, so both ratios are printed. Times are projected
to the 2,493-row test set: floor(2493 / batch) batches x s/batch, plus the last batch of the
remaining rows, timed after a warm-up run of it (`--no-tail`, or `--varied`: every batch counted
as a full one). Run by hand on a GPU:

    PYTHONPATH=src python bench/predict.py                          # batch 16 and 64, with baseline
    PYTHONPATH=src python bench/predict.py --batch-sizes 64,128 --no-baseline
    PYTHONPATH=src python bench/predict.py --small                  # tiny preset; runs on CPU

`--varied` draws each prompt's length and image size (longest first, as predict orders them), so
batches differ in shape: it shows what compiling and capturing cost when shapes change, and
reports any graph compiled while timed. `--answer-limit N` sizes the KV cache for N new tokens
(as `max_new_tokens: 4096` in configs/ovis2_5-9b/predict.yaml does) while still decoding
`--new-tokens` steps: what a real run pays when answers stop long before the limit.
`--attend-multiple` is the decode attention's length step (`DecodeOptions.attend_multiple`; a
huge value attends over the whole cache).

Each variant of `--decode-attention` is timed: a decode attention (`sdpa`, `matmul`, `split_kv`)
with optional suffixes, `+fp8kv` (a float8 KV cache, split_kv only) and `+fp8prefill` (the
prefill's projections as FP8 matmuls, `litovis.model.fp8_prefill`); `--fp8-prefill` adds a
`+fp8prefill` copy of each variant. "agree" compares a variant's greedy tokens with
transformers' on the same text batch: rows whose first token / all tokens agree (bf16 rounding
differs between the two, and random weights give near-flat logits, so full-row agreement is
informative, not a pass/fail).
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from litovis.model.attention import varlen_kernel_name
from litovis.model.checkpoint import build_ovis
from litovis.model.config import OvisConfig
from litovis.model.decoding import DecodeOptions, EncodedPrompt, FastGenerator
from litovis.model.flops import (
    llm_forward_flops_per_token,
    measure_matmul_tflops,
    visual_head_forward_flops_per_atom,
    vit_forward_flops_per_patch,
)
from litovis.model.fp8_prefill import disable_fp8_prefill, enable_fp8_prefill
from litovis.model.generation import GenerationConfig
from litovis.model.presets import preset
from litovis.model.tokens import IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID

sys.path.insert(0, str(Path(__file__).parent))
from train_step import compiled_graphs  # noqa: E402
from transformers_generate import agreement, run_transformers, transformers_llm  # noqa: E402

TEST_ROWS = 2493
QWEN_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|> (also pad)
QWEN_TEXT_VOCAB = 151643  # ids below <|endoftext|> are ordinary text tokens


def eos_ids(vocab: int) -> tuple[int, ...]:
    """Qwen's eos ids, or the last two ids of a smaller (tiny) vocabulary."""
    return QWEN_EOS if vocab > max(QWEN_EOS) else (vocab - 1, vocab - 2)


@dataclass
class Timing:
    """One implementation at one batch size."""

    name: str
    batch: int
    rows: int
    prompt_tokens: float
    seconds: list[float]
    new_tokens: int
    prefill: list[float] | None = None
    decode_ms: list[float] | None = None
    prefill_tflops: float | None = None
    peak_gib: float | None = None
    agree: str = ""
    tail_seconds: float | None = None  # the test set's last, partial batch, timed

    @property
    def per_batch(self) -> float:
        return sum(self.seconds) / len(self.seconds)

    @property
    def prefill_s(self) -> float | None:
        return sum(self.prefill) / len(self.prefill) if self.prefill else None

    @property
    def decode_ms_per_step(self) -> float | None:
        return sum(self.decode_ms) / len(self.decode_ms) if self.decode_ms else None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / sum(self.seconds)

    def projected_min(self) -> float:
        """Minutes for the test set: its full batches at the mean time, and its last partial batch
        at the time measured for it (at a full batch's time when it was not measured)."""
        if self.tail_seconds is None:
            return math.ceil(TEST_ROWS / self.batch) * self.per_batch / 60
        return (TEST_ROWS // self.batch * self.per_batch + self.tail_seconds) / 60


def random_text(shape: tuple[int, ...], vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Random ordinary text ids (Qwen's special ids excluded; any id of a smaller vocabulary)."""
    return torch.randint(0, min(vocab, QWEN_TEXT_VOCAB), shape, generator=gen)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synth_prompts(rows: int, tokens: int, grid: tuple[int, int, int], config: OvisConfig,
                  seed: int, varied: bool = False) -> list[EncodedPrompt]:
    """`rows` prompts of `tokens` ids; every other row has one image of `grid` patches.

    `varied`: each prompt's length is drawn in [0.6, 1.4] x `tokens` and each image's side (a
    multiple of 32 px) up to the largest whose atoms fit in 85 % of its prompt; prompts come
    longest first, as `litovis predict` orders them.
    """
    gen = torch.Generator().manual_seed(seed)
    vit, vocab = config.vit, config.llm.vocab_size
    block = vit.patch_size * vit.hidden_stride
    patch_dim = vit.num_channels * vit.patch_size**2
    pixels_of: dict[tuple[int, int, int], torch.Tensor] = {}  # per grid: the values do not change the work
    prompts = []
    for row in range(rows):
        length = round(tokens * (0.6 + 0.8 * torch.rand((), generator=gen).item())) if varied else tokens
        if varied:
            largest = int((0.85 * length) ** 0.5) * block  # (side / block)^2 atoms
            sides = list(range(min(448, largest), largest + 1, block)) or [block]
            side = sides[int(torch.randint(len(sides), (), generator=gen))] // vit.patch_size
            grid = (1, side, side)
        if row % 2 == 0:
            t, h, w = grid
            atoms = t * h * w // vit.hidden_stride**2
            if grid not in pixels_of:
                pixels_of[grid] = torch.rand(t * h * w, patch_dim, generator=gen) * 2 - 1
            text = length - atoms - 2
            if text < 2:
                raise SystemExit(f"--prompt-tokens {length} leaves no room for text beside {atoms} atoms")
            ids = random_text((text,), vocab, gen)
            span = torch.tensor([IMAGE_START_ID] + [VISUAL_ATOM_ID] * atoms + [IMAGE_END_ID])
            ids = torch.cat([ids[: text // 2], span, ids[text // 2:]])
            prompts.append(EncodedPrompt(ids, pixels_of[grid], torch.tensor([grid])))
        else:
            prompts.append(EncodedPrompt(random_text((length,), vocab, gen)))
    if varied:
        prompts.sort(key=lambda p: -p.input_ids.numel())
    return prompts


def prefill_flops(config: OvisConfig, prompts: list[EncodedPrompt]) -> float:
    """Forward FLOPs of a packed prefill: LLM over every prompt token (lm_head only on the last), vision."""
    llm = config.llm
    head = 2.0 * llm.vocab_size * llm.hidden_size
    total = 0.0
    for prompt in prompts:
        length = prompt.input_ids.numel()
        total += length * (llm_forward_flops_per_token(llm, length) - head) + head
        if prompt.grid_thws is not None:
            t, h, w = prompt.grid_thws[0].tolist()
            total += t * h * w * vit_forward_flops_per_patch(config.vit, h * w)
            total += t * h * w // config.vit.hidden_stride**2 * visual_head_forward_flops_per_atom(config)
    return total


def run_ours(model, config: GenerationConfig, options: DecodeOptions, batch: int, prompts: list[EncodedPrompt],
             text_batch: list[EncodedPrompt] | None, device: torch.device,
             varied: bool = False, tail: int = 0) -> tuple[Timing, Timing | None, list]:
    """Warm-up, timed batches, the test set's last batch of `tail` rows (warmed up, then timed; 0:
    none), then the text-only batch (timed, tokens kept for agreement)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = FastGenerator(model, config, options)
    # warm-up (allocation, graph capture, compile): the first batch, or every batch of varied ones
    for start in range(0, len(prompts) if varied else batch, batch):
        generator.prefill(prompts[start:start + batch])
        generator.decode(max_steps=config.min_new_tokens - 1)
    graphs = compiled_graphs()
    seconds, prefill, decode_ms, flops = [], [], [], 0.0
    new_tokens = 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        synchronize(device)
        began = time.perf_counter()
        steps = generator.decode_steps
        generator.prefill(chunk)
        synchronize(device)
        prefilled = time.perf_counter()
        outputs = generator.decode(max_steps=config.min_new_tokens - 1)  # ends with a copy to the host
        ended = time.perf_counter()
        seconds.append(ended - began)
        prefill.append(prefilled - began)
        decode_ms.append((ended - prefilled) * 1000 / max(generator.decode_steps - steps, 1))
        new_tokens += sum(o.numel() for o in outputs)
        flops += prefill_flops(model.config, chunk)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    mean_len = sum(p.input_ids.numel() for p in prompts) / len(prompts)
    ours = Timing("litovis", batch, len(prompts), mean_len, seconds, new_tokens, prefill, decode_ms,
                  flops / sum(prefill) / 1e12, peak)
    recompiled = (compiled_graphs() or 0) - (graphs or 0)  # None: the counter moved in this torch
    if recompiled:
        print(f"batch {batch}: {recompiled} graphs were compiled while timed (the timing includes compilation)")
    if tail:
        for _ in range(2):  # the first run captures graphs and compiles for the new row count; the second is kept
            synchronize(device)
            began = time.perf_counter()
            generator.prefill(prompts[:tail])
            generator.decode(max_steps=config.min_new_tokens - 1)
            ours.tail_seconds = time.perf_counter() - began
    text_timing, text_tokens = None, []
    if text_batch is not None:
        synchronize(device)
        began = time.perf_counter()
        text_tokens = generator.generate(text_batch)
        seconds = time.perf_counter() - began
        text_timing = Timing("litovis text", batch, len(text_batch), text_batch[0].input_ids.numel(), [seconds],
                             sum(o.numel() for o in text_tokens))
    del generator
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ours, text_timing, text_tokens


def print_table(timings: list[Timing]) -> None:
    header = (f"{'impl':<28} {'batch':>5} {'rows':>5} {'prompt':>7} {'s/batch':>8} {'new tok/s':>10} "
              f"{'prefill s':>9} {'TFLOP/s':>8} {'decode ms/step':>14} {'2,493 rows':>10} {'peak GiB':>8}  agree")
    print(header)
    print("-" * len(header))
    for t in timings:
        prefill = f"{t.prefill_s:.2f}" if t.prefill else "-"
        tflops = f"{t.prefill_tflops:.0f}" if t.prefill_tflops else "-"
        decode = f"{t.decode_ms_per_step:.2f}" if t.decode_ms else "-"
        peak = f"{t.peak_gib:.1f}" if t.peak_gib is not None else "-"
        print(f"{t.name:<28} {t.batch:>5} {t.rows:>5} {t.prompt_tokens:>7.0f} {t.per_batch:>8.2f} "
              f"{t.tokens_per_s:>10.0f} {prefill:>9} {tflops:>8} {decode:>14} {t.projected_min():>8.1f} m "
              f"{peak:>8}  {t.agree}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 16,64; --small: 2,4)")
    parser.add_argument("--rows", type=int, default=0, help="rows timed per batch size (default: 2 batches)")
    parser.add_argument("--small", action="store_true", help="tiny preset, CPU unless CUDA is present")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers' generate")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the LLM decoder and ViT encoder layers in place")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--decode-attention", default="sdpa,matmul",
                        help="variants to time, comma-separated: sdpa, matmul or split_kv, each with optional "
                             "+fp8kv and +fp8prefill suffixes")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default 1940; --small: 64)")
    parser.add_argument("--image-side", type=int, default=None, help="image side in px (default 1280; --small: 64)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--answer-limit", type=int, default=None,
                        help="max_new_tokens the cache is sized for (default: --new-tokens); no baseline then")
    parser.add_argument("--attend-multiple", type=int, default=DecodeOptions.attend_multiple)
    parser.add_argument("--varied", action="store_true",
                        help="prompt lengths in [0.6, 1.4] x --prompt-tokens, image sides up to what fits, longest "
                             "first; every batch runs once untimed first")
    parser.add_argument("--fp8-prefill", action="store_true",
                        help="time every variant again with FP8 prefill projections (the +fp8prefill suffix)")
    parser.add_argument("--tail", action=argparse.BooleanOptionalAction, default=True,
                        help="time the test set's last, partial batch for the projection (else: as a full one)")
    parser.add_argument("--max-prefill-tokens", type=int, default=16384)
    parser.add_argument("--sync-every", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    small = args.small
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not small and device.type != "cuda":
        raise SystemExit("the 9B benchmark needs CUDA; use --small on CPU")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("2,4" if small else "16,64")).split(",")]
    tokens = args.prompt_tokens or (64 if small else 1940)
    side = args.image_side or (64 if small else 1280)

    torch.manual_seed(args.seed)
    dtype = torch.float32 if small and device.type == "cpu" else torch.bfloat16
    model = build_ovis(preset("tiny" if small else "9b"), dtype=dtype, device=device).eval()
    vocab = model.config.llm.vocab_size
    vit = model.config.vit
    if side % (vit.patch_size * vit.hidden_stride):
        raise SystemExit(f"--image-side must be a multiple of {vit.patch_size * vit.hidden_stride} "
                         f"(patch {vit.patch_size} x hidden stride {vit.hidden_stride})")
    grid = (1, side // vit.patch_size, side // vit.patch_size)
    atoms = grid[1] * grid[2] // vit.hidden_stride**2
    if args.compile:
        model.compile_layers()
        # Each variant adds graphs to the same layers (a predict run has one variant): past the
        # default limit of 8, dynamo would run the later variants eagerly.
        torch._dynamo.config.recompile_limit = 64
    eos = eos_ids(vocab)
    limit = args.answer_limit or args.new_tokens
    if limit < args.new_tokens:
        raise SystemExit("--answer-limit must be at least --new-tokens")
    if limit > args.new_tokens and not args.no_baseline:
        raise SystemExit("--answer-limit needs --no-baseline (transformers would decode to the limit)")
    config = GenerationConfig(max_new_tokens=limit, min_new_tokens=args.new_tokens, eos_token_ids=eos,
                              pad_token_id=eos[1])
    variants = args.decode_attention.split(",")
    if args.fp8_prefill:
        variants += [f"{name}+fp8prefill" for name in variants]
    options = {name: DecodeOptions(max_prefill_tokens=args.max_prefill_tokens, sync_every=args.sync_every,
                                   cuda_graphs=args.cuda_graphs, decode_attention=name.split("+")[0],
                                   fp8_kv_cache="+fp8kv" in name, attend_multiple=args.attend_multiple)
               for name in variants}
    for variant in options.values():
        variant.validate()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}; "
          f"torch {torch.__version__}; python {platform.python_version()}; {'tiny' if small else '9b'} in {dtype}")
    kernel = varlen_kernel_name() if device.type == "cuda" else None
    print(f"prefill attention: {kernel or 'SDPA with a block mask (no varlen kernel)'}; decode: "
          f"{'CUDA graph' if args.cuda_graphs and device.type == 'cuda' else 'eager'}"
          f"{' + torch.compile' if args.compile else ''}; sync every {args.sync_every} steps")
    if device.type == "cuda":
        print(f"bf16 matmul peak: {measure_matmul_tflops(device):.0f} TFLOP/s")
    shape = (f"{tokens} x [0.6, 1.4] tokens, every other row one image of at most 85 % of its tokens, longest first"
             if args.varied else f"{tokens} tokens, every other row one {side}x{side} image ({atoms} atoms)")
    print(f"prompts: {shape}; "
          f"{args.new_tokens} new tokens forced; KV cache for {limit} new tokens, attended in steps of "
          f"{args.attend_multiple} slots; projection: {TEST_ROWS} rows\n")

    hf = None if args.no_baseline else transformers_llm(model, device)
    if hf is not None:  # transformers' own warm-up (kernels, allocator)
        warm = random_text((2, 16), vocab, torch.Generator().manual_seed(args.seed)).to(device)
        hf.generate(input_ids=warm, attention_mask=torch.ones_like(warm), do_sample=False, max_new_tokens=4,
                    pad_token_id=eos[1], eos_token_id=list(eos))
    timings: list[Timing] = []
    ratios: list[str] = []
    for batch in batch_sizes:
        rows = args.rows or 2 * batch
        prompts = synth_prompts(rows, tokens, grid, model.config, seed=args.seed + batch, varied=args.varied)
        # Text-only prompts, drawn once: transformers runs them all, ours the first batch (agreement).
        text_ids, text = None, None
        if hf is not None:
            batches = -(-rows // batch)
            text_ids = random_text((batches * batch, tokens), vocab, torch.Generator().manual_seed(args.seed + 1000 + batch))
            text = [EncodedPrompt(row.clone()) for row in text_ids[:batch]]
        ours_runs = []
        for name, variant in options.items():
            if "+fp8prefill" in name:
                enable_fp8_prefill(model)
            try:
                tail = TEST_ROWS % batch if args.tail and not args.varied else 0
                ours, ours_text, text_tokens = run_ours(model, config, variant, batch, prompts, text, device,
                                                        args.varied, tail)
            except RuntimeError as err:  # report and go on with the other variants
                print(f"batch {batch}, decode attention {name}: FAILED: {err}")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            finally:
                disable_fp8_prefill(model)  # the next variant starts from the bf16 model
            ours.name = f"litovis {name}"
            timings.append(ours)
            detail = "" if not ours.prefill else f", prefill {ours.prefill_s:.2f} s, decode {ours.decode_ms_per_step:.2f} ms/step"
            peak = "" if ours.peak_gib is None else f", peak {ours.peak_gib:.1f} GiB"
            print(f"batch {batch}, {name}: {ours.per_batch:.2f} s/batch{detail}, projected "
                  f"{ours.projected_min():.2f} min{peak}", flush=True)  # progress, in case the run is cut short
            if ours_text is not None:
                ours_text.name = f"  text {name}"
                timings.append(ours_text)
                ours_runs.append((name, ours, ours_text, text_tokens))
        if hf is None or not ours_runs:
            continue
        seconds, produced, peak, their_tokens = run_transformers(hf, batch, text_ids, args.new_tokens, eos, device)
        theirs = Timing("transformers", batch, len(text_ids), tokens, seconds, produced, peak_gib=peak)
        timings.append(theirs)
        for name, ours, ours_text, text_tokens in ours_runs:
            ours_text.agree = agreement(text_tokens, their_tokens)
            ratios.append(f"batch {batch}, {name}: {ours.tokens_per_s / theirs.tokens_per_s:.1f}x (half the rows "
                          f"with images), {ours_text.tokens_per_s / theirs.tokens_per_s:.1f}x (same text-only batch)")
    print_table(timings)
    if ratios:
        print("\nnew tokens/s, litovis / transformers generate:")
        for line in ratios:
            print("  " + line)


if __name__ == "__main__":
    main()
