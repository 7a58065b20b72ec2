"""Benchmark: full LoRA training steps of Ovis2.5-9B (litovis) against transformers + peft, one GPU.

A step is what `litovis fit` runs per optimizer step: each packed micro-batch is moved to the GPU
and goes through `OvisFineTuner.training_loss` (the Lightning `training_step` path: Ovis forward,
chunked CE/DFT, per-token stats) under bf16 autocast, then backward; after the last micro-batch
come the module's grad-norm hook, gradient clipping and the fused AdamW of `build_optimizer`
(float32 master adapters). The model is the module's own (`configure_model`: random bf16 9B
built on the GPU, rank-64 rsLoRA on all 7 projections; `default` init, as PiSSA does not change
step cost). Steps are timed with CUDA events after warm-up; peak memory is reset per row.

Workloads (data are random ids/pixels, reproducible; the packing is `TokenBudgetBatchSampler`'s
best-fit within a 64-budget bucket, as the data module does, then `collate_packed`):
  a         8 text samples x 2048 tokens per step, every token but the first trained.
  b         16 samples per step: 60 % one image (sides 448..1792 px, multiples of 32) + a 20-100
            token question + 50-400 answer tokens; 40 % text of 300-3000 tokens with a 50-400
            token answer. Packed to --budget tokens per micro-batch, accumulated to one step.
  c         b's exact steps with the DFT loss.
  baseline  transformers Qwen3ForCausalLM (the 9B's LLM, random bf16) + peft LoRA (same
            settings), SDPA, non-reentrant checkpointing on all layers, HF's own loss, 8 x 2048,
            same autocast, clipping and fused AdamW. Runs first and is freed before litovis.

Columns: tok/step, smp/step and mb/step (micro-batches) per optimizer step; tok/s counts every
position (visual ones too); TFLOP/s and MFU follow `litovis.model.flops.training_flops` (LoRA:
4N per token plus causal attention, frozen vision forward; recomputation not counted) against
the bf16 matmul rate measured at start (`measure_matmul_tflops`); peak = max allocated;
real % = real tokens / computed positions (packing has no padding); fill % = tokens /
(micro-batches x budget); loss = the last timed step's loss (random init: about ln 151936 = 11.9).

Settings: each (budget, checkpointed layers) pair of --settings (or of --budget x --ckpt-layers)
runs every litovis workload; `--compile both` then builds a compiled model and reruns the settings
that worked, fastest first, the mix before a; each value of `--act-budgets` (compiler
recomputation) and of `--offload-layers` (saved activations in host memory) is one more pass.
Rows run in isolation (an OOM or compile error is printed and the next row runs), are printed and
saved to --json as they finish, and rows that would end past --time-limit are skipped.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=src python bench/train_step.py \
        --settings 16384:36,16384:28 --compile both --json out.json
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=src python bench/train_step.py \
        --workloads baseline,a,b --compile on --act-budgets 0.4 --offload-layers 8 \
        --settings 8192:0,4096:0 --loss-chunk 256 --warmup 4     # the targets' run (RESULTS.md run 8)
    PYTHONPATH=src python bench/train_step.py --small     # tiny preset on CPU: the script runs
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from train_stacks import baseline_batches, baseline_step, build_baseline, build_litovis, fused_adamw, litovis_step
from train_workloads import FULL, SMALL, Scale, Workload, make_workloads

from litovis.data.batching import PackedBatch
from litovis.model.attention import varlen_kernel_name
from litovis.model.flops import measure_matmul_tflops, training_flops
from litovis.model.presets import preset
from litovis.training.config import LossConfig
from litovis.training.lora import LoRAConfig


# ------------------------------------------------------------------ timing and reporting
@dataclass
class Row:
    """One table row; per-step figures are means over the timed steps."""

    workload: str
    setting: str
    status: str = "ok"
    tokens_per_step: float = math.nan
    samples_per_step: float = math.nan
    micro_batches_per_step: float = math.nan
    seconds_per_step: float = math.nan
    median_seconds: float = math.nan
    tokens_per_s: float = math.nan
    samples_per_s: float = math.nan
    tflops: float = math.nan
    mfu: float = math.nan
    peak_gib: float = math.nan
    real_pct: float = math.nan
    fill_pct: float = math.nan
    loss: float = math.nan
    graphs_compiled_while_timed: int | None = None
    step_seconds: list[float] = field(default_factory=list)


COLUMNS = ["workload", "setting", "tok/step", "smp/step", "mb/step", "s/step", "med s", "tok/s", "smp/s",
           "TFLOP/s", "MFU %", "peak GiB", "real %", "fill %", "loss"]


def format_row(row: Row) -> str:
    if row.status != "ok":
        return "| " + " | ".join([row.workload, row.setting, row.status] + [""] * (len(COLUMNS) - 3)) + " |"
    values = [(row.tokens_per_step, 0), (row.samples_per_step, 1), (row.micro_batches_per_step, 1),
              (row.seconds_per_step, 3), (row.median_seconds, 3), (row.tokens_per_s, 0), (row.samples_per_s, 2),
              (row.tflops, 1), (100 * row.mfu, 1), (row.peak_gib, 1), (row.real_pct, 1), (row.fill_pct, 1),
              (row.loss, 3)]
    cells = ["-" if math.isnan(v) else f"{v:,.{d}f}" for v, d in values]
    setting = row.setting + (" (recompiled while timed!)" if row.graphs_compiled_while_timed else "")
    return "| " + " | ".join([row.workload, setting, *cells]) + " |"


def compiled_graphs() -> int | None:
    """Graphs dynamo has compiled so far (an internal counter; None if it moved)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def time_steps(step: Callable, warmup: list, timed: list, device: torch.device) -> tuple[list[float], float, float, int | None]:
    """Seconds of each timed step, peak GiB since the warm-up began, the last loss, graphs compiled while timed."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for micro_batches in warmup:
        step(micro_batches)
    if cuda:
        torch.cuda.synchronize(device)
    graphs = compiled_graphs()
    marks: list = []

    def mark() -> None:
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    for micro_batches in timed:
        mark()
        loss = step(micro_batches)
    mark()
    if cuda:
        torch.cuda.synchronize(device)
        seconds = [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        seconds, peak = [b - a for a, b in itertools.pairwise(marks)], math.nan
    after = compiled_graphs()
    return seconds, peak, float(loss), None if graphs is None or after is None else after - graphs


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Report:
    """Prints the table row by row (flushed) and rewrites the JSON file after every row."""

    def __init__(self, json_path: str | None, meta: dict) -> None:
        self.json_path, self.meta, self.rows = json_path, meta, []
        print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(format_row(row), flush=True)
        if self.json_path:
            with open(self.json_path, "w", encoding="utf-8") as handle:
                json.dump({**self.meta, "rows": [asdict(r) for r in self.rows]}, handle, indent=1)
        return row


class Bench:
    """Runs rows, each isolated: a failure (OOM, compile error) is reported and the next row runs."""

    def __init__(self, args: argparse.Namespace, scale: Scale, device: torch.device, report: Report) -> None:
        self.args, self.scale, self.device, self.report = args, scale, device, report
        self.config = preset(scale.preset)
        self.started = time.perf_counter()
        self.matmul: float | None = None
        self.step_seconds: dict[str, float] = {}  # latest s/step per workload, for the time guard
        self.compiled_once = False  # a compiled row has run (compilation happened in its warm-up)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {message}", flush=True)

    def fits_in_time(self, workload: str, compiled: bool) -> bool:
        """Whether the row should end before --time-limit (estimated from earlier rows)."""
        estimate = (self.args.warmup + self.args.steps) * self.step_seconds.get(workload, 0.0)
        if compiled and not self.compiled_once:
            estimate += self.args.compile_allowance
        return time.perf_counter() - self.started + estimate <= self.args.time_limit

    def run(self, workload: str, setting: str, step: Callable, warmup: list, timed: list, counts: Callable,
            budget: int | None, compiled: bool = False) -> Row:
        row = Row(workload, setting)
        if not self.fits_in_time(workload, compiled):
            row.status = f"skipped: would pass --time-limit {self.args.time_limit:g} s"
            return self.report.add(row)
        self.log(f"{workload} | {setting}: {len(warmup)} warm-up + {len(timed)} timed steps")
        try:
            seconds, peak, loss, graphs = time_steps(step, warmup, timed, self.device)
            tokens, samples, flops = (sum(values) for values in zip(*(counts(s) for s in timed), strict=True))
            n, total, micro = len(timed), sum(seconds), sum(len(s) for s in timed)
            row.step_seconds, row.graphs_compiled_while_timed = seconds, graphs
            row.tokens_per_step, row.samples_per_step, row.micro_batches_per_step = tokens / n, samples / n, micro / n
            row.seconds_per_step, row.median_seconds = total / n, float(np.median(seconds))
            row.tokens_per_s, row.samples_per_s, row.tflops = tokens / total, samples / total, flops / total / 1e12
            row.mfu = row.tflops / self.matmul if self.matmul else math.nan
            row.peak_gib, row.loss, row.real_pct = peak, loss, 100.0  # packed and equal-length rows: no padding
            row.fill_pct = 100 * tokens / (budget * micro) if budget else math.nan
            self.step_seconds[workload] = row.seconds_per_step
            self.compiled_once = self.compiled_once or compiled
        except Exception as err:  # noqa: BLE001 - one failing row must not end the benchmark
            first_line = (str(err).strip().splitlines() or [""])[0][:160]
            row.status = f"failed: {type(err).__name__}: {first_line}"
            print("".join(traceback.format_exception(err, limit=-4)), flush=True)
        release(self.device)
        return self.report.add(row)

    def packed_counts(self, micro_batches: list[PackedBatch]) -> tuple[int, int, float]:
        """Tokens, samples and model FLOPs of one optimizer step."""
        tokens = samples = 0
        flops = 0.0
        for batch in micro_batches:
            lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
            patches = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
            tokens, samples = tokens + sum(lengths), samples + len(lengths)
            flops += training_flops(self.config, lengths, patches)
        return tokens, samples, flops

    def baseline(self) -> Row:
        scale, device, args = self.scale, self.device, self.args
        setting = f"transformers+peft, sdpa, ckpt all, {scale.text_samples} x {scale.text_length}"
        self.log("building the transformers + peft baseline")
        try:
            model = build_baseline(self.config.llm, LoRAConfig(init="default", dropout=args.lora_dropout), device)
            optimizer = fused_adamw([p for p in model.parameters() if p.requires_grad])
        except Exception as err:  # noqa: BLE001
            traceback.print_exc(file=sys.stdout)
            return self.report.add(Row("baseline", setting, status=f"failed to build: {type(err).__name__}: {err}"[:200]))
        batches = baseline_batches(scale, args.warmup + args.steps, self.config.llm.vocab_size, device.type == "cuda")
        per_step = (scale.text_samples * scale.text_length, scale.text_samples,
                    training_flops(self.config, [scale.text_length] * scale.text_samples))
        row = self.run("baseline", setting, baseline_step(model, optimizer, args.clip, device),
                       batches[: args.warmup], batches[args.warmup :], lambda _: per_step, None)
        del model, optimizer
        release(device)
        return row

    def litovis(self, names: list[str], settings: list[tuple[int, int]]) -> list[Row]:
        """Every (budget, ckpt) setting eager and/or compiled; one model build per mode."""
        args, device, rows = self.args, self.device, []
        data: dict[int, dict[str, Workload]] = {}
        eager_speed: dict[tuple[int, int], float] = {}
        budgets = [float(b) for b in args.act_budgets.split(",")]
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        offloads = [int(k) for k in args.offload_layers.split(",")]
        passes = [(c, b, k) for c in modes for b in (budgets if c else [1.0]) for k in offloads]
        for compiled, act_budget, offload in passes:
            mode = ("compiled" if act_budget == 1 else f"compiled, act {act_budget:g}") if compiled else "eager"
            mode += f", offload {offload}" if offload else ""
            if compiled:
                torch._dynamo.reset()  # a new activation budget needs fresh graphs
            order = settings
            if compiled and eager_speed:  # compile the fastest eager settings first; skip failed ones
                order = sorted((s for s in settings if s in eager_speed), key=lambda s: -eager_speed[s])
            module = optimizer = None
            if time.perf_counter() - self.started + (args.compile_allowance if compiled else 0) > args.time_limit:
                no_model = f"skipped: no time left for the {mode} pass (--time-limit)"
            else:
                self.log(f"building litovis ({self.scale.preset}, {mode})")
                no_model = "failed: the model was not built"
                try:
                    module = build_litovis(self.scale, compiled, device, args.attn, args.lora_dropout, act_budget,
                                           args.loss_chunk, offload)
                    optimizer = module.build_optimizer()
                except Exception:  # noqa: BLE001
                    traceback.print_exc(file=sys.stdout)
            for budget, ckpt in order:
                setting = f"budget {budget}, ckpt {ckpt}, {mode}"
                if budget not in data:
                    try:
                        data[budget] = make_workloads(self.scale, budget, args.warmup, args.steps,
                                                      self.config.llm.vocab_size, device.type == "cuda")
                    except Exception as err:  # noqa: BLE001 - e.g. a budget below the longest sample
                        print(f"cannot make steps for budget {budget}: {err}", flush=True)
                        data[budget] = {}
                # Compiled: the mix first, so its varying shapes give dynamic graphs that a then reuses
                # (and the time guard keeps the most telling rows).
                for name in sorted(names, key="bca".index) if compiled else names:
                    work = data[budget].get(name)
                    if module is None or work is None:
                        why = no_model if module is None else "failed: no data for this budget"
                        rows.append(self.report.add(Row(name, setting, status=why)))
                        continue
                    module.ovis.llm.set_gradient_checkpointing(True, num_layers=ckpt)
                    module.loss_kind = work.loss_kind
                    step = litovis_step(module, optimizer, args.clip, device)
                    rows.append(self.run(name, setting, step, work.warmup, work.timed, self.packed_counts,
                                         budget, compiled))
                    if rows[-1].status == "ok" and not compiled and name in ("a", "b"):
                        eager_speed[(budget, ckpt)] = rows[-1].tokens_per_s
                    elif rows[-1].status.startswith("failed") and optimizer is not None:
                        optimizer.zero_grad(set_to_none=True)
            del module, optimizer
            release(device)
        return rows


def parse_settings(args: argparse.Namespace, scale: Scale, parser: argparse.ArgumentParser) -> list[tuple[int, int]]:
    """(budget, checkpointed layers) pairs: --settings, else every --budget x --ckpt-layers."""
    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v.strip()]

    try:
        if args.settings:
            settings = [tuple(ints(pair.replace(":", ","))) for pair in args.settings.split(",") if pair.strip()]
        else:
            budgets = ints(args.budget) if args.budget else [scale.budget]
            ckpts = ints(args.ckpt_layers) if args.ckpt_layers else [1 if args.small else 28]
            settings = [(b, k) for b in budgets for k in ckpts]
    except ValueError as err:
        parser.error(f"--settings, --budget and --ckpt-layers take integers: {err}")
    if any(len(pair) != 2 for pair in settings):
        parser.error("--settings takes BUDGET:CKPT pairs, e.g. 16384:36,8192:18")
    layers = preset(scale.preset).llm.num_hidden_layers
    if any(not 0 <= k <= layers or b < 1 for b, k in settings):
        parser.error(f"checkpointed layers must be within 0..{layers} and budgets positive: {settings}")
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="baseline,a,b,c", help="comma list of baseline, a, b, c")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    parser.add_argument("--budget", default=None, help="tokens per micro-batch, comma list allowed "
                        "(default 16384; 1024 with --small)")
    parser.add_argument("--ckpt-layers", default=None, help="decoder layers with activation checkpointing, "
                        "comma list allowed (default 28 of 36: fits 80 GB at budget 16384)")
    parser.add_argument("--settings", default=None, help="BUDGET:CKPT pairs instead of --budget x --ckpt-layers")
    parser.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                        help="torch.compile each decoder layer; `both`: the eager pass, then a compiled pass "
                        "over the eager settings that ran, fastest first")
    parser.add_argument("--compile-allowance", type=float, default=150.0,
                        help="seconds the time guard adds for the first compiled row (compilation)")
    parser.add_argument("--attn", default="auto", choices=["auto", "varlen", "sdpa"],
                        help="litovis attention backend (auto: the varlen flash kernel on CUDA)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout of both stacks")
    parser.add_argument("--act-budgets", default="1.0",
                        help="compiled passes: comma list of memory.activation_memory_budget values, one pass each")
    parser.add_argument("--offload-layers", default="0",
                        help="comma list of memory.offload_layers values (saved activations of the first k layers "
                             "in pinned host memory), one pass each")
    parser.add_argument("--loss-chunk", type=int, default=LossConfig.chunk_size,
                        help="target tokens per chunk of litovis's chunked loss (peak grows by chunk x vocab x 6 bytes)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="skip rows that would end after this many seconds (they are printed as skipped)")
    parser.add_argument("--small", action="store_true", help="tiny preset on CPU (checks the script runs)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(names) - {"baseline", "a", "b", "c"}:
        parser.error(f"unknown workloads {sorted(set(names) - {'baseline', 'a', 'b', 'c'})}")
    scale = SMALL if args.small else FULL
    if not args.small and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --small to check the script on CPU")
    device = torch.device("cpu" if args.small else "cuda")
    settings = parse_settings(args, scale, parser)
    warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")  # no Trainer: the hook's log is a no-op
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed checkpointing API
    import peft
    import transformers

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "varlen_kernel": varlen_kernel_name(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "argv": sys.argv[1:], "preset": scale.preset,
        "matmul_tflops": measure_matmul_tflops(device) if device.type == "cuda" else None,
    }
    for key, value in meta.items():
        print(f"# {key}: {value}")
    bench = Bench(args, scale, device, Report(args.json, meta))
    bench.matmul = meta["matmul_tflops"]
    baseline = bench.baseline() if "baseline" in names else None
    lit_names = [n for n in ("a", "b", "c") if n in names]
    rows = bench.litovis(lit_names, settings) if lit_names else []
    for row in rows:
        if baseline is not None and baseline.status == "ok" and row.workload == "a" and row.status == "ok":
            print(f"litovis/baseline on a ({row.setting}): tokens/s x{row.tokens_per_s / baseline.tokens_per_s:.2f}, "
                  f"peak memory x{row.peak_gib / baseline.peak_gib:.2f}", flush=True)
    bench.log("done")


if __name__ == "__main__":
    main()
