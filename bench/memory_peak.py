"""Where the peak memory of one litovis training step goes: the live GPU allocations at the peak,
grouped by the Python line that made them.

Builds the module as `bench/train_step.py` does, runs warm-up steps of workload a (text, 8 × 2,048)
or b (the mix), then records the CUDA caching allocator's history over one more step
(`torch.cuda.memory._record_memory_history`), replays its alloc/free events to find the peak and
prints the allocations alive there: those made before the step (weights, adapters, optimizer
state) as one line, the step's own by source line, largest first, and the phase the peak fell in.
A compiled layer's buffers show up under its generated `call` function.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=src python bench/memory_peak.py \
        --budget 4096 --compile --act-budget 0.4
    PYTHONPATH=src python bench/memory_peak.py --small     # tiny preset: checks the script runs
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import FULL, SMALL, build_litovis, litovis_step, make_workloads  # noqa: E402

GIB = 2**30


def frame_label(frames: list[dict]) -> str:
    """The innermost frame in litovis, peft, torch's autograd or a generated compiled graph."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(key in name for key in ("litovis", "peft", "torchinductor", "autograd", "bench/")):
            return f"{Path(name).name}:{frame.get('line')} {frame.get('name')}"
    return "(no python frame)" if not frames else f"{Path(frames[0]['filename']).name}:{frames[0]['line']}"


def peak_of(trace: list[dict], before: int) -> tuple[int, int, dict[int, dict]]:
    """Replay alloc/free events: (peak bytes, index of the peak event, live allocations there)."""
    live: dict[int, dict] = {}
    current, peak, peak_index, peak_live = before, before, -1, {}
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        if current > peak:
            peak, peak_index, peak_live = current, index, dict(live)
    return peak, peak_index, peak_live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="a", choices=["a", "b"])
    parser.add_argument("--budget", type=int, default=4096, help="tokens per micro-batch")
    parser.add_argument("--ckpt-layers", type=int, default=0, help="decoder layers with activation checkpointing")
    parser.add_argument("--compile", action="store_true", help="compile the decoder layers")
    parser.add_argument("--act-budget", type=float, default=1.0, help="memory.activation_memory_budget")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="loss.chunk_size")
    parser.add_argument("--offload-layers", type=int, default=0, help="memory.offload_layers")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="source lines to print")
    parser.add_argument("--small", action="store_true", help="tiny preset (the script runs; needs CUDA)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_peak.py needs CUDA: it reads the CUDA caching allocator's history")
    device = torch.device("cuda")
    scale = SMALL if args.small else FULL
    module = build_litovis(scale, args.compile, device, act_budget=args.act_budget, loss_chunk=args.loss_chunk,
                           offload_layers=args.offload_layers)
    module.ovis.llm.set_gradient_checkpointing(True, num_layers=args.ckpt_layers)
    optimizer = module.build_optimizer()
    work = make_workloads(scale, args.budget, args.warmup, 1, module.ovis.config.llm.vocab_size, True)[args.workload]
    step = litovis_step(module, optimizer, 1.0, device)
    for micro_batches in work.warmup:
        step(micro_batches)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(context="all", stacks="python", max_entries=2_000_000)
    step(work.timed[0])
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][device.index or 0]
    peak, index, live = peak_of(trace, before)
    print(f"setting: workload {args.workload}, budget {args.budget}, ckpt {args.ckpt_layers}, "
          f"compile {args.compile}, act {args.act_budget:g}, loss chunk {args.loss_chunk}, "
          f"offload {args.offload_layers}")
    print(f"max_memory_allocated {torch.cuda.max_memory_allocated() / GIB:.2f} GiB; replayed peak "
          f"{peak / GIB:.2f} GiB at event {index} of {len(trace)}")
    if index >= 0:
        print(f"the allocation that made the peak: {frame_label(trace[index]['frames'])}")
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        group = groups[frame_label(event["frames"])]
        group[0] += event["size"]
        group[1] += 1
    print(f"{before / GIB:8.2f} GiB  before the step (weights, adapters, optimizer state)")
    for label, (size, count) in sorted(groups.items(), key=lambda item: -item[1][0])[: args.top]:
        print(f"{size / GIB:8.2f} GiB  {count:5d} x  {label}")


if __name__ == "__main__":
    main()
