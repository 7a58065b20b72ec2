"""`GracefulStop` in-process on the demo config: a signal mid-accumulation stops at the step boundary,
saves `last.ckpt`, exits 143, and the resumed run continues exactly like one that never stopped.

The signals are sent by the process to itself (`os.kill(os.getpid(), ...)`); the subprocess tests in
`tests/test_reliability.py` signal a whole `litovis fit` process group, workers included.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from litovis.cli import LitovisCLI
from litovis.training.graceful_stop import GracefulStop
from tests.test_cli import demo_config

pytestmark = pytest.mark.usefixtures("in_repo")  # the sample's paths are relative to the repository


class MicroBatchLosses(L.Callback):
    """The loss of every training micro-batch, keyed by (epoch, batch index)."""

    def __init__(self) -> None:
        self.losses: dict[tuple[int, int], float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses[(trainer.current_epoch, batch_idx)] = float(outputs["loss"])


class SendSignals(L.Callback):
    """Sends `signals` to this process as the `at`-th micro-batch it runs (0-based) starts."""

    def __init__(self, at: int, signals: list[int]) -> None:
        self.at, self.signals, self.seen = at, signals, 0

    def on_train_batch_start(self, *args: Any) -> None:
        if self.seen == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)
        self.seen += 1


CHANGES = {
    "trainer.max_steps": 10,
    "trainer.accumulate_grad_batches": 2,
    "trainer.val_check_interval": 8,
    "data.num_workers": 0,
}


def _fit(config: Path, recorder: MicroBatchLosses, *callbacks: L.Callback, ckpt_path: str | None = None) -> LitovisCLI:
    cli = LitovisCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks.insert(0, recorder)  # records a micro-batch before GracefulStop may end the run
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def _trainable(cli: LitovisCLI) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}


def test_sigterm_mid_accumulation_saves_at_the_step_boundary_and_resumes_exactly(tmp_path: Path, sample_prepare: dict) -> None:
    straight = MicroBatchLosses()
    reference = _fit(demo_config(tmp_path / "straight", sample_prepare, save_every=100, **CHANGES), straight)
    assert len(straight.losses) == 20

    directory = tmp_path / "stopped"
    config = demo_config(directory, sample_prepare, save_every=100, **CHANGES)
    before = signal.getsignal(signal.SIGTERM)
    stopped = MicroBatchLosses()
    # Micro-batch 6 is the first half of optimizer step 3: the stop must wait for the second half.
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, stopped, SendSignals(at=6, signals=[signal.SIGTERM]))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before, "handlers are restored"
    assert max(stopped.losses) == (0, 7)
    last = directory / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4

    resumed = MicroBatchLosses()
    cli = _fit(config, resumed, ckpt_path="last")
    assert min(resumed.losses) == (0, 8)
    assert {**stopped.losses, **resumed.losses} == straight.losses
    final, expected = _trainable(cli), _trainable(reference)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_second_ctrl_c_aborts_without_saving(tmp_path: Path, sample_prepare: dict) -> None:
    directory = tmp_path / "aborted"
    config = demo_config(directory, sample_prepare, save_every=100, **CHANGES)
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, MicroBatchLosses(), SendSignals(at=2, signals=[signal.SIGINT, signal.SIGINT]))
    assert exit_info.value.code == 1  # Lightning's exit status for an interrupted run
    assert not (directory / "checkpoints" / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_needs_a_save_last_checkpoint_directory(tmp_path: Path) -> None:
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path)], logger=False)
    with pytest.raises(ValueError, match="save_last"):
        GracefulStop().setup(trainer, L.LightningModule(), "fit")
    with pytest.raises(ValueError, match="SIGUSR1"):
        GracefulStop(signals=["SIGTERM", "SIGUSR1"])
