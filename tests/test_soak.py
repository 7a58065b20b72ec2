"""Soak: thousands of tiny-model steps with a crash and resume every few hundred, in one process.

Checks that (1) resident memory does not trend upwards after warm-up, (2) file descriptors and
child processes (DataLoader workers) do not accumulate across resumes, (3) within every epoch each
training sample is seen exactly once — across crashes, replays and resumes — and replayed
micro-batches hold the same samples as the first time.

As a test: `pytest -m slow tests/test_soak.py`. As a script (prints a JSON summary):
`PYTHONPATH=src python -m tests.test_soak --steps 3000 --resume-every 300`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml

from litovis.cli import LitovisCLI
from tests.reliability_probes import rss_bytes
from tests.test_cli import REPO, demo_config


class SimulatedCrash(RuntimeError):
    """Ends a soak segment the way an unexpected error would."""


class SoakProbe(L.Callback):
    """Records sample ids per (epoch, micro-batch) and RSS per optimizer step; crashes at `crash_at`."""

    def __init__(self, batches: dict[tuple[int, int], list[str]], rss: dict[int, int], crash_at: int | None) -> None:
        self.batches, self.rss, self.crash_at = batches, rss, crash_at
        self.replay_mismatches: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        key = (trainer.current_epoch, batch_idx)
        if key in self.batches and self.batches[key] != list(batch.sample_ids):
            self.replay_mismatches.append(key)
        self.batches[key] = list(batch.sample_ids)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.rss[trainer.global_step] = rss_bytes()
        if trainer.global_step == self.crash_at:
            raise SimulatedCrash(f"crash after step {self.crash_at}")


def _children() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        text = (task / "children").read_text().split()
        pids.update(int(p) for p in text)
    return pids


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sample_prepare(root: Path) -> dict:
    """The bundled sample's prepare settings, writing under `root`."""
    prepare = yaml.safe_load((REPO / "configs/prepare/sample.yaml").read_text())
    prepare["output_dir"] = str(root / "prepared")
    prepare["image_dir"] = str(root / "images")
    prepare["fetch"]["progress"] = False
    return prepare


def soak(workdir: Path, steps: int = 3000, resume_every: int = 300, crash_offset: int = 37) -> dict:
    """Run the soak in `workdir`; returns a summary (see the module doc for what is checked).

    Memory is judged after the first segment (the warm-up: first compilations, allocator pools).
    """
    os.chdir(REPO)  # the sample's paths are relative to the repository
    config = demo_config(workdir, sample_prepare(workdir), save_every=resume_every, **{
        "trainer.max_steps": steps,
        "trainer.val_check_interval": 500,
        "trainer.enable_progress_bar": False,
        "data.num_workers": 1,
        "model.lora.dropout": 0.05,
        "callbacks.LossSchedule.dft_from_step": steps // 2,
    })
    batches: dict[tuple[int, int], list[str]] = {}
    rss: dict[int, int] = {}
    resources: list[tuple[int, int]] = []  # (open fds, child processes) after each segment
    mismatches: list[tuple[int, int]] = []
    started = time.monotonic()
    ckpt_path, segments, train_ids = None, 0, None
    while True:
        segments += 1
        # Crash a little after each checkpoint: the steps since it are replayed after the resume.
        crash_at = segments * resume_every + crash_offset
        probe = SoakProbe(batches, rss, crash_at if crash_at < steps else None)
        cli = LitovisCLI(args=["--config", str(config)], run=False)
        cli.trainer.callbacks.append(probe)
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
            finished = True
        except SimulatedCrash:
            finished = False
        train_ids = sorted(s.id for s in cli.datamodule._splits["train"].samples)
        mismatches += probe.replay_mismatches
        del cli, probe
        gc.collect()
        resources.append((_open_fds(), len(_children())))
        ckpt_path = "last"
        if finished:
            break
    runtime = time.monotonic() - started

    epochs: dict[int, list[str]] = {}
    for (epoch, _), ids in sorted(batches.items()):
        epochs.setdefault(epoch, []).extend(ids)
    last_epoch = max(epochs)
    after = [rss[s] for s in sorted(rss) if s > resume_every]
    tenth = max(1, len(after) // 10)
    return {
        "steps": max(rss),
        "segments": segments,
        "runtime_s": round(runtime, 1),
        "epochs": len(epochs),
        "complete_epochs_exact": all(sorted(ids) == train_ids for e, ids in epochs.items() if e != last_epoch),
        "last_epoch_no_duplicates": len(epochs[last_epoch]) == len(set(epochs[last_epoch])),
        "replay_mismatches": mismatches,
        "rss_mib_early": round(statistics.median(after[:tenth]) / 2**20, 1),
        "rss_mib_late": round(statistics.median(after[-tenth:]) / 2**20, 1),
        "rss_mib_max": round(max(after) / 2**20, 1),
        "fds_per_segment": [f for f, _ in resources],
        "children_per_segment": [c for _, c in resources],
    }


def check(summary: dict, steps: int) -> None:
    """The soak's assertions on a `soak` summary."""
    assert summary["steps"] == steps
    assert summary["epochs"] >= 3
    assert summary["complete_epochs_exact"], "a sample was seen twice or skipped within an epoch"
    assert summary["last_epoch_no_duplicates"]
    assert summary["replay_mismatches"] == []
    # Resident memory after warm-up may wobble but must not trend upwards.
    assert summary["rss_mib_late"] - summary["rss_mib_early"] < max(32.0, 0.05 * summary["rss_mib_early"]), summary
    fds = summary["fds_per_segment"]
    assert max(fds) - min(fds) <= 4, f"file descriptors accumulate across resumes: {fds}"
    assert max(summary["children_per_segment"]) == 0, "DataLoader workers outlive their run"


@pytest.mark.slow
def test_soak_memory_flat_every_sample_once_per_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    steps = int(os.environ.get("LITOVIS_SOAK_STEPS", 3000))
    summary = soak(tmp_path, steps=steps, resume_every=max(50, steps // 10))
    print(json.dumps(summary))
    check(summary, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps in all")
    parser.add_argument("--resume-every", type=int, default=300, help="steps between checkpoints (and crashes)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = soak(args.workdir or Path(tmp), steps=args.steps, resume_every=args.resume_every)
    print(json.dumps(summary, indent=1))
    check(summary, args.steps)
    print("soak passed")


if __name__ == "__main__":
    main()
