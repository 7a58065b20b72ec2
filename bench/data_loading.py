"""Benchmark: throughput of the real training data path on this machine's CPUs.

`SampleDataset` (prompt rendering, JPEG decode, resize, normalize + patchify, tokenization) ->
`ResumableDataLoader` with a `TokenBudgetBatchSampler` -> `collate_packed`, exactly as the data
module wires them, over `vqa` samples that each hold one synthetic JPEG photo-like image (smooth
colour fields plus grain, quality 90) and a short answer, with the tiny tokenizer and the
official pixel budget (448² .. 1792²). Rows: worker processes x image path, where `fast` is the
preprocessor's `image_patches` and `reference` the step-by-step `patchify(normalize_pixels(...))`
it replaced (bit-identical output; patched in before the workers fork). Then a single-process
profile says where the time of one sample goes.

    PYTHONPATH=src python bench/data_loading.py                    # 200 images of 1344 x 1344
    PYTHONPATH=src python bench/data_loading.py --workers 0,1,2 --images 50 --side 896

samples/s, patches/s and MB/s (float32 pixel_values) count the batches handed to the training
loop, from the first `next()` to the last batch (worker start-up included). On a shared machine
these follow the load; the CPU milliseconds per sample (user + system, of the worker processes
and of the main process) do much less, and 1000 / (worker ms) is what one free core delivers.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import litovis.processing.image as image_module
from litovis.data.batching import collate_packed
from litovis.data.dataset import SampleDataset, measure_samples
from litovis.data.drops import DropReport
from litovis.data.loader import ResumableDataLoader
from litovis.data.prompts import load_templates
from litovis.data.sample import Sample
from litovis.data.sampler import TokenBudgetBatchSampler
from litovis.processing.image import (
    load_image,
    normalize_pixels,
    patchify,
    smart_resize,
    to_rgb,
)
from litovis.processing.processor import OvisProcessor
from litovis.processing.tiny_tokenizer import build_tiny_tokenizer

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts.yaml"
TASK = "vqa"


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth random colour fields (a bicubic-upscaled 24 x 24 grid) plus sensor-like grain."""
    coarse = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), mode="RGB")
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.normal(0.0, 6.0, smooth.shape).astype(np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8), mode="RGB")


def write_images(directory: Path, count: int, width: int, height: int, quality: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = directory / f"img{width}x{height}_{i:04d}.jpg"
        photo_like(rng, width, height).save(path, format="JPEG", quality=quality)
        paths.append(path)
    return paths


def reference_image_patches(image: Image.Image, patch_size: int = 16, hidden_stride: int = 2):
    """The step-by-step path `image_patches` replaced."""
    return patchify(normalize_pixels(image), patch_size, hidden_stride)


def run_loader(dataset: SampleDataset, lengths: list[int], targets: list[int], workers: int, budget: int) -> dict:
    sampler = TokenBudgetBatchSampler(lengths, [TASK] * len(lengths), max_tokens=budget, num_targets=targets,
                                      shuffle=True, bucket_budgets=64, seed=0)
    loader = ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=partial(collate_packed, task_vocab=[TASK]),
                                 num_workers=workers, generator=torch.Generator().manual_seed(0))
    samples = patches = batches = 0
    cpu_before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    began = time.perf_counter()
    first = None
    for batch in loader:
        first = first if first is not None else time.perf_counter() - began
        batches += 1
        samples += len(batch.sample_ids)
        patches += 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    seconds = time.perf_counter() - began
    del loader, batch
    gc.collect()  # the workers have exited and been joined: their CPU time is in RUSAGE_CHILDREN
    main_cpu, worker_cpu = (
        after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        for before, after in zip(cpu_before, (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)), strict=True)
    )
    return {"workers": workers, "batches": batches, "samples": samples, "seconds": seconds,
            "first_batch_s": first, "samples_per_s": samples / seconds, "patches_per_s": patches / seconds,
            "mb_per_s": patches * 768 * 4 / seconds / 1e6,
            "main_cpu_ms_per_sample": 1e3 * main_cpu / samples, "worker_cpu_ms_per_sample": 1e3 * worker_cpu / samples}


def timed(fn: Callable, repeats: int) -> tuple[float, object]:
    """Median milliseconds of `fn()` over `repeats` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times), result


def profile(paths: list[Path], resize_paths: list[Path], processor: OvisProcessor, dataset: SampleDataset,
            budget_samples: int) -> list[tuple[str, float]]:
    """Median ms per image of each stage, single process, single thread."""
    torch.set_num_threads(1)
    n = len(paths)
    stages: dict[str, list[float]] = {}

    def record(name: str, fn: Callable) -> object:
        ms, result = timed(fn, 1)
        stages.setdefault(name, []).append(ms)
        return result

    for index, path in enumerate(paths):
        data = record("read file", path.read_bytes)

        def decode(data: bytes = data) -> Image.Image:
            opened = Image.open(io.BytesIO(data))  # in-memory: nothing to close
            opened.load()
            return opened

        decoded = record("JPEG decode (PIL)", decode)
        rgb = record("to_rgb (EXIF, mode, copy)", partial(to_rgb, decoded))
        record("normalize + patchify, reference", partial(reference_image_patches, rgb))
        record("image_patches (fast, same bits)", partial(image_module.image_patches, rgb))
        record("whole sample: SampleDataset[i]", partial(dataset.__getitem__, index))
    for path in resize_paths:
        image = load_image(path)
        height, width = smart_resize(image.height, image.width)
        record(f"resize {image.width}x{image.height} -> {width}x{height} (bilinear)",
               partial(image.resize, (width, height), resample=image_module.RESAMPLE))
    items = [dataset[i] for i in range(min(budget_samples, n))]
    ms, batch = timed(lambda: collate_packed(items, [TASK]), 3)
    stages["collate_packed (per sample)"] = [ms / len(items)]
    pixels = batch.pixel_values
    clone_ms, _ = timed(pixels.clone, 3)
    both_ms, _ = timed(lambda: pixels.clone().share_memory_(), 3)
    stages["worker -> main: copy into shared memory (per sample)"] = [(both_ms - clone_ms) / len(items)]
    parts = [item.pixel_values for item in items]

    def cat_into_shared() -> torch.Tensor:
        # what torch's default_collate does inside workers: concatenate straight into shared memory
        storage = torch.UntypedStorage._new_shared(pixels.numel() * pixels.element_size())
        out = torch.empty(0, dtype=pixels.dtype).set_(storage).view(pixels.shape)
        return torch.cat(parts, out=out)

    ms, shared = timed(cat_into_shared, 3)
    assert torch.equal(shared, pixels)
    stages["(alternative) cat into shared memory (per sample)"] = [ms / len(items)]
    return [(name, statistics.median(values)) for name, values in stages.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="JPEG images (one per sample)")
    parser.add_argument("--side", type=int, default=1344, help="image side in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--workers", default="1,2,4", help="comma list of DataLoader worker counts")
    parser.add_argument("--paths", default="fast,reference", help="image paths to run: fast, reference")
    parser.add_argument("--budget", type=int, default=16384, help="tokens per micro-batch")
    parser.add_argument("--profile", type=int, default=20, help="images in the per-stage profile (0 = none)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # more workers than cores: on purpose

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# nproc {cores}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} (before), "
          f"torch {torch.__version__}, python {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="litovis-bench-") as tmp:
        began = time.perf_counter()
        paths = write_images(Path(tmp), args.images, args.side, args.side, args.quality, seed=0)
        resize_paths = write_images(Path(tmp), 3, 2000, 1500, args.quality, seed=1) if args.profile else []
        size_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"# wrote {len(paths)} JPEGs of {args.side}x{args.side} (mean {size_kb:.0f} KiB) in "
              f"{time.perf_counter() - began:.1f} s", flush=True)
        samples = [Sample(id=f"s{i}", task=TASK, fields={"question": "What is written on the sign at the top?"},
                          images=[str(p)], target="Harbour Road", source=f"bench:{i}") for i, p in enumerate(paths)]
        templates = load_templates(PROMPTS)
        processor = OvisProcessor(build_tiny_tokenizer(), min_pixels=448 * 448, max_pixels=1792 * 1792)
        measured = measure_samples(samples, processor, templates, DropReport())
        dataset = SampleDataset(measured.samples, processor, templates)
        print(f"# {len(measured.samples)} samples of {measured.lengths[0]} tokens "
              f"({processor.num_atoms((1, args.side // 16, args.side // 16))} visual atoms), budget {args.budget}\n")

        rows = []
        print("| image path | workers | batches | samples | s | first batch s | samples/s | patches/s | MB/s "
              "| CPU ms/sample, workers | CPU ms/sample, main |")
        print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        fast = image_module.image_patches
        for path_name in [p.strip() for p in args.paths.split(",") if p.strip()]:
            image_module.image_patches = fast if path_name == "fast" else reference_image_patches
            for workers in [int(w) for w in args.workers.split(",")]:
                row = {"path": path_name, **run_loader(dataset, measured.lengths, measured.num_targets, workers,
                                                       args.budget)}
                rows.append(row)
                print(f"| {path_name} | {workers} | {row['batches']} | {row['samples']} | {row['seconds']:.1f} | "
                      f"{row['first_batch_s']:.2f} | {row['samples_per_s']:.1f} | {row['patches_per_s']:,.0f} | "
                      f"{row['mb_per_s']:.0f} | {row['worker_cpu_ms_per_sample']:.0f} | "
                      f"{row['main_cpu_ms_per_sample']:.0f} |", flush=True)
        image_module.image_patches = fast

        stages = []
        if args.profile:
            print("\n| stage (one process, one thread) | ms per image |\n|---|---|")
            stages = profile(paths[: args.profile], resize_paths, processor, dataset, budget_samples=9)
            for name, ms in stages:
                print(f"| {name} | {ms:.1f} |", flush=True)
    print(f"\n# load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} (after)")
    if args.json:
        Path(args.json).write_text(json.dumps({"nproc": cores, "args": vars(args), "rows": rows,
                                               "stages_ms": dict(stages)}, indent=1))


if __name__ == "__main__":
    main()
