"""`ThroughputLogger`: tokens/s, samples/s, model TFLOP/s, MFU and peak memory per optimizer step.

Times are wall-clock between optimizer-step ends (the loss logging already synchronises once per
step), counts are summed over the step's micro-batches and over ranks. FLOPs follow
`litovis.model.flops`; MFU's denominator is `peak_tflops` or, on CUDA, a bf16 matmul rate
measured once at the start of training on the same GPU.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from litovis.model.flops import measure_matmul_tflops, training_flops


class ThroughputLogger(L.Callback):
    """Logs `perf/*` figures every optimizer step and key ones to the progress bar.

    Args:
        peak_tflops: bf16 peak per device for MFU; None = measure on CUDA, no MFU on CPU.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops
        self._start: float | None = None
        self._counts = torch.zeros(3, dtype=torch.float64)  # tokens, samples, flops
        self._step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_tflops is None and pl_module.device.type == "cuda":
            self.peak_tflops = measure_matmul_tflops(pl_module.device)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._step = trainer.global_step
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        patches = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        flops = training_flops(
            pl_module.ovis.config,
            lengths,
            patches,
            full_llm=pl_module.finetune == "full",
            vision_trains=pl_module.trainable.vit,
        )
        self._counts += torch.tensor([sum(lengths), len(lengths), flops], dtype=torch.float64)
        if trainer.global_step == self._step:
            return  # still accumulating
        self._step = trainer.global_step
        now = time.perf_counter()
        seconds, self._start = now - self._start, now
        # clone: on one CPU device `.to()` and `reduce` hand back the very tensor zeroed below
        counts = trainer.strategy.reduce(self._counts.to(pl_module.device).clone(), reduce_op="sum").cpu()
        self._counts.zero_()
        tokens, samples, total_flops = counts.tolist()
        logs = {
            "perf/tokens_per_s": tokens / seconds,
            "perf/samples_per_s": samples / seconds,
            "perf/tflops_per_device": total_flops / seconds / trainer.world_size / 1e12,
        }
        if self.peak_tflops:
            logs["perf/mfu"] = logs["perf/tflops_per_device"] / self.peak_tflops
        if pl_module.device.type == "cuda":
            logs["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)
        pl_module.log("tok/s", logs["perf/tokens_per_s"], prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
