"""Benchmark: Ovis2.5-9B LoRA training on 1 GPU, then on N GPUs with Lightning's DDP and FSDP.

Each mode is a real `litovis fit` run (Lightning launches the ranks) of the `9b` preset (random
bf16 weights: nothing is read from disk) with the reference LoRA (r64, rsLoRA, all 7 LLM
projections; PiSSA with a 4-iteration randomised SVD instead of the full one, which would add
minutes), gradient checkpointing, bf16-mixed, on synthetic samples of real size fed through the
real data pipeline: one 1344x1344 JPEG (1,764 visual atoms) plus ~260 text tokens each, 8 packed
into each 16,384-token micro-batch, one micro-batch per GPU per optimizer step (so every GPU does
the same work in every mode). 20 optimizer steps; the first 5 are not timed.

Printed per mode: tokens/s in all and per GPU, the speed-up over 1 GPU (target for DDP on 2 GPUs:
>= 1.85x), model TFLOP/s per GPU (`litovis.model.flops`), and the peak memory of every GPU
(allocated / reserved). Results also go to `<workdir>/<mode>/result.json`.

    python bench/scale_out.py                       # 1 GPU, DDP on 2, FSDP on 2 (~7 min on 2 H200)
    python bench/scale_out.py --modes ddp fsdp      # some modes only
    python bench/scale_out.py --small               # tiny model, 2 CPU processes: checks the script
    python bench/scale_out.py --modes single ddp --compile   # compiled layers (FSDP refuses them)
    python bench/scale_out.py --modes fsdp --finetune full    # full fine-tuning of the LLM, sharded

The ranks of a mode are started by Lightning (its launcher re-runs `litovis fit`); this script
only writes the data and configs, runs the modes one after the other and prints their results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
MODES = ("single", "ddp", "fsdp")
WORDS = "lorem ipsum dolor sit amet "  # about 16 tiny-tokenizer tokens


class ScaleOutProbe(L.Callback):
    """Times optimizer steps after `warmup`, counts tokens and FLOPs, records every rank's peak
    memory; rank 0 writes the totals to `result` at the end of training.

    Args:
        result: JSON file to write.
        warmup: optimizer steps left out of the timing (allocator, kernels, data workers).
    """

    def __init__(self, result: str, warmup: int) -> None:
        self.result = Path(result)
        self.warmup = warmup
        self._counts = [0, 0, 0.0]  # tokens, samples, model FLOPs of the timed steps (this rank)
        self._start: float | None = None
        self._step_times: list[float] = []
        self._last: float | None = None

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        from litovis.model.flops import training_flops

        step = trainer.global_step  # optimizer steps done (accumulate 1: one per micro-batch)
        if step == self.warmup:
            self._sync(pl_module)
            self._start = self._last = time.perf_counter()
            return
        if self._start is None:
            return
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        patches = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        self._counts[0] += sum(lengths)
        self._counts[1] += len(lengths)
        self._counts[2] += training_flops(pl_module.ovis.config, lengths, patches, full_llm=pl_module.finetune == "full",
                                          vision_trains=pl_module.trainable.vit)
        now = time.perf_counter()
        self._step_times.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        if self._start is None:
            raise RuntimeError(f"training stopped before the {self.warmup} warm-up steps were over")
        cuda = pl_module.device.type == "cuda"
        mine = {
            "rank": trainer.global_rank,
            "seconds": time.perf_counter() - self._start,
            "tokens": self._counts[0],
            "samples": self._counts[1],
            "flops": self._counts[2],
            "step_seconds": self._step_times,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(pl_module.device) / 2**30 if cuda else None,
            "device": torch.cuda.get_device_name(pl_module.device) if cuda else "cpu",
        }
        ranks = [mine]
        if trainer.world_size > 1:
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, mine)
        if trainer.global_rank == 0:
            world = trainer.world_size
            seconds = max(r["seconds"] for r in ranks)
            tokens = sum(r["tokens"] for r in ranks)
            summary = {
                "world_size": world,
                "timed_steps": len(self._step_times),
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "tokens_per_s_per_gpu": tokens / seconds / world,
                "samples_per_s": sum(r["samples"] for r in ranks) / seconds,
                "tflops_per_gpu": sum(r["flops"] for r in ranks) / seconds / world / 1e12,
                "tokens_per_step": tokens / max(1, len(self._step_times)),
                "ranks": ranks,
            }
            self.result.parent.mkdir(parents=True, exist_ok=True)
            self.result.write_text(json.dumps(summary, indent=1))


def write_dataset(directory: Path, samples: int, image_side: int, text_repeats: int, images: int = 16) -> None:
    """`train.parquet` of `samples` chat samples, each one image (of `images` distinct JPEGs) and
    text; the images are smooth random colour fields (JPEG-decoded like photos, not like noise)."""
    import numpy as np
    from PIL import Image

    from litovis.data.prepare import _write_parquet
    from litovis.data.sample import Sample

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(images):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((image_side, image_side), Image.BICUBIC)
        path = directory / f"image{i}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    text = (WORDS * text_repeats).strip()
    rows = [
        Sample(id=f"bench-{i}", task="chat", source=f"bench:{i}", images=[paths[i % images]], messages=[
            {"role": "user", "content": f"<image>\n{text}"},
            {"role": "assistant", "content": text},
        ])
        for i in range(samples)
    ]
    _write_parquet(rows, directory / "train.parquet")


def mode_config(mode: str, args: argparse.Namespace, data: Path, result: Path) -> dict[str, Any]:
    """The `litovis fit` configuration of one mode (all keys explicit: nothing from configs/)."""
    devices = 1 if mode == "single" else args.devices
    strategy: Any = {"single": "auto", "ddp": "ddp"}.get(mode)
    if mode == "fsdp":
        strategy = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}
    side = args.image_side
    return {
        "seed_everything": 42,
        "trainer": {
            "accelerator": "cpu" if args.small else "gpu",
            "devices": devices,
            "strategy": strategy,
            "precision": "32-true" if args.small else "bf16-mixed",
            "max_steps": args.steps,
            "accumulate_grad_batches": 1,
            "gradient_clip_val": 1.0,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "use_distributed_sampler": False,
            "default_root_dir": str(result.parent),  # where LightningCLI saves the resolved config
            "callbacks": [{"class_path": "scale_out.ScaleOutProbe",
                           "init_args": {"result": str(result), "warmup": args.warmup}}],
        },
        "model": {
            "source": {"preset": "tiny" if args.small else "9b", "tokenizer": "tiny",
                       "dtype": "float32" if args.small else "bfloat16"},
            "finetune": args.finetune,
            "lora": {"rank": 8 if args.small else 64, "alpha": 16.0 if args.small else 128.0, "dropout": 0.05,
                     "rslora": True, "init": "pissa_niter_4"},
            "optimizer": {"lr": 2.0e-5, "warmup_steps": 2},
            "memory": {"gradient_checkpointing": not args.small, "compile": args.compile},
        },
        "data": {
            "prepared_dir": str(data),
            "prompts": str(REPO / "configs/prompts.yaml"),
            "processing": {"min_pixels": side * side, "max_pixels": side * side, "max_length": args.max_tokens},
            "batching": {"max_tokens": args.max_tokens, "max_samples": args.samples_per_batch, "bucket_budgets": None},
            "num_workers": args.num_workers,
        },
    }


def run_mode(mode: str, args: argparse.Namespace, workdir: Path, data: Path, timeout: float) -> dict[str, Any]:
    """Run `litovis fit` for one mode; its result (or its failure, with the log's tail)."""
    import yaml

    directory = workdir / mode
    directory.mkdir(parents=True, exist_ok=True)
    result = directory / "result.json"
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(mode_config(mode, args, data, result)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "bench"), env.get("PYTHONPATH", "")])
    if args.small:
        env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    log = directory / "log.txt"
    with log.open("w") as out:
        # A new session: on a timeout the whole process group (Lightning's other ranks too) is ended.
        process = subprocess.Popen([sys.executable, "-m", "litovis", "fit", "--config", str(config)], cwd=REPO,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            code = f"timeout ({timeout:.0f} s)"
    wall = time.perf_counter() - started
    if code != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        return {"mode": mode, "failed": f"exit {code} after {wall:.0f} s; log {log}:\n{tail}"}
    summary = json.loads(result.read_text())
    summary.update(mode=mode, wall_seconds=wall)
    return summary


def report(results: list[dict[str, Any]]) -> str:
    """A table of the modes, with the speed-up over the single-GPU run when there is one."""
    base = next((r for r in results if r["mode"] == "single" and "failed" not in r), None)
    lines = [f"{'mode':<7} {'GPUs':>4} {'tokens/s':>10} {'per GPU':>9} {'speed-up':>8} {'TFLOP/s/GPU':>11} "
             f"{'s/step':>7} {'wall s':>7}  peak memory per GPU, GiB (allocated/reserved)"]
    for r in results:
        if "failed" in r:
            lines.append(f"{r['mode']:<7} FAILED: {r['failed']}")
            continue
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        steps = sorted(s for rank in r["ranks"] for s in rank["step_seconds"])
        memory = ", ".join(
            f"{m['peak_allocated_gib']:.1f}/{m['peak_reserved_gib']:.1f}" if m["peak_allocated_gib"] is not None else "-"
            for m in r["ranks"]
        )
        lines.append(
            f"{r['mode']:<7} {r['world_size']:>4} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_gpu']:>9,.0f} "
            f"{speedup:>8} {r['tflops_per_gpu']:>11.1f} {steps[len(steps) // 2]:>7.2f} {r['wall_seconds']:>7.0f}  {memory}"
        )
    device = next((r["ranks"][0]["device"] for r in results if "ranks" in r), "?")
    tokens = next((r["tokens_per_step"] / r["world_size"] for r in results if "ranks" in r), 0)
    lines.append(f"device: {device}; {tokens:,.0f} tokens per GPU per optimizer step (s/step: median)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--devices", type=int, default=2, help="GPUs of the DDP and FSDP runs")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--max-tokens", type=int, default=16384, help="token budget of a micro-batch")
    parser.add_argument("--samples-per-batch", type=int, default=8)
    parser.add_argument("--image-side", type=int, default=1344, help="pixels; 1344 = 1,764 visual atoms")
    parser.add_argument("--text-repeats", type=int, default=8, help=f"repeats of {WORDS.strip()!r} per message")
    parser.add_argument("--num-workers", type=int, default=6, help="data workers per GPU")
    parser.add_argument("--budget", type=float, default=530, help="seconds for all modes together; a mode "
                        "still running when they are spent is stopped and reported as failed")
    parser.add_argument("--workdir", type=Path, default=None, help="data, configs, logs (default: a temp dir)")
    parser.add_argument("--small", action="store_true", help="tiny model on CPU processes (a smoke test)")
    parser.add_argument("--compile", action="store_true", help="model.memory.compile (single and ddp: FSDP refuses it)")
    parser.add_argument("--finetune", choices=("lora", "full"), default="lora",
                        help="full: every LLM weight trains (with FSDP on 2 GPUs: fp32 master + AdamW states, ~72 GB per GPU)")
    args = parser.parse_args(argv)
    if args.compile and "fsdp" in args.modes:
        parser.error("--compile: FSDP refuses model.memory.compile; choose --modes single ddp")
    if args.small:
        args.image_side, args.max_tokens, args.samples_per_batch, args.text_repeats = 64, 1024, 4, 2
        args.steps, args.warmup, args.num_workers = min(args.steps, 6), min(args.warmup, 2), 0
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scale_out_"))
    data = workdir / "data"
    # Enough micro-batches for every rank of every mode to run all its steps within one epoch.
    write_dataset(data, samples=args.samples_per_batch * args.devices * (args.steps + 2), image_side=args.image_side,
                  text_repeats=args.text_repeats)
    results = []
    deadline = started + args.budget
    for mode in args.modes:
        results.append(run_mode(mode, args, workdir, data, timeout=max(1.0, deadline - time.perf_counter())))
        print(report(results[-1:]), flush=True)
    print("\n" + report(results))
    if any("failed" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
