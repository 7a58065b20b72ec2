"""`GracefulStop`: SIGTERM/SIGINT finish the optimizer step, save `last.ckpt`, and exit 143/130.

What Lightning 2.6 does by itself (read from its source): its SignalConnector turns SIGTERM into
`trainer.received_sigterm`, and the training loop raises `SIGTERMException` — a `SystemExit` with
no code — at the end of the current *micro-batch* (mid-accumulation included): the callbacks'
`on_exception` run and the process exits with status 0, having saved nothing (`OnExceptionCheckpoint`
would save, possibly mid-accumulation, under its own name). SIGINT (Ctrl+C) becomes
`KeyboardInterrupt`: `on_exception`, then exit status 1, nothing saved. A preempted run thus loses
everything since its last rolling checkpoint, and with SIGTERM it even reports success.

With this callback, while training, SIGTERM and SIGINT only record a request. At the next
optimizer-step boundary every rank takes part in a max-reduce of the request (ranks that got no
signal stop at the same step), the state is saved with `trainer.save_checkpoint` as `last.ckpt` of
the `save_last` ModelCheckpoint — where `--ckpt_path last` looks — and the process exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT), the shell's convention for "ended by
that signal", so `litovis fit ... && litovis predict ...` does not go on with an unfinished model.
A second Ctrl+C aborts at once, without saving. A validation in progress finishes first.

DataLoader workers must survive the signal until then: a terminal's Ctrl+C, `kill -- -<pgid>` and
SLURM reach every process, and a worker killed by it crashes the trainer (PyTorch's SIGCHLD check)
before the step boundary. `shield_worker_from_stop_signals` (the data module's `worker_init_fn`)
makes workers ignore SIGINT and ignore SIGTERM unless it comes from their parent, which is how the
DataLoader itself stops a worker.

Clusters: under SLURM keep Lightning's own auto-requeue (`SLURMEnvironment(auto_requeue=True)`, the
default there; submit with `#SBATCH --signal=SIGUSR1@90`): on SIGUSR1 Lightning saves
`hpc_ckpt_<n>.ckpt` in `default_root_dir` and requeues the job, and the requeued job resumes from it
when started without `--ckpt_path`. This callback never touches SIGUSR1.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class StopRequested(SystemExit):
    """Raised after the stop checkpoint is saved; exits the process with `128 + signal number`."""


def shield_worker_from_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: stop signals aimed at the trainer do not kill its workers.

    SIGINT is ignored. SIGTERM is blocked and taken by a watcher thread that exits the worker only
    when the parent sent it (the DataLoader's `terminate()`), like PyTorch's own worker handler;
    where `sigwaitinfo` is missing (macOS) SIGTERM keeps PyTorch's handling.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="sigterm-from-parent-only", daemon=True).start()


def _last_checkpoint_path(trainer: L.Trainer) -> Path:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath is not None:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    raise ValueError(
        "GracefulStop saves where `--ckpt_path last` looks: configure a ModelCheckpoint with a fixed "
        "`dirpath` and `save_last: true`"
    )


class GracefulStop(L.Callback):
    """Stop on SIGTERM/SIGINT at an optimizer-step boundary, with a resumable `last.ckpt` (module doc).

    Args:
        signals: names of the signals that request the stop.
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGINT")) -> None:
        unknown = [name for name in signals if name not in signal.Signals.__members__]
        if unknown:
            raise ValueError(f"unknown signal name(s) {unknown}")
        if "SIGUSR1" in signals:
            raise ValueError("SIGUSR1 belongs to Lightning's SLURM auto-requeue; do not route it here")
        self.signals = [signal.Signals[name] for name in signals]
        self.requested: int | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._target: Path | None = None
        self._step_seen = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._target = _last_checkpoint_path(trainer)

    # ------------------------------------------------------------------ signals
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt  # the second Ctrl+C: abort now, without saving
        if self.requested is None:
            self.requested = signum
            log.warning(
                "received %s: stopping after the current optimizer step and saving %s "
                "(Ctrl+C again aborts without saving)",
                signal.Signals(signum).name,
                self._target,
            )

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("GracefulStop: not on the main thread, signal handlers not installed")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = signal.SIGTERM if trainer.received_sigterm else None  # arrived before training
        self._step_seen = trainer.global_step
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step_seen:
            return  # mid-accumulation: the optimizer step is not complete yet
        self._step_seen = trainer.global_step
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return  # the run is complete: let it end normally
        signum = self.requested or 0
        if trainer.world_size > 1:
            flag = torch.tensor(float(signum), device=pl_module.device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not signum:
            return
        assert self._target is not None
        trainer.save_checkpoint(self._target)
        name = signal.Signals(signum).name
        log.warning(
            "stopped on %s after optimizer step %d; saved %s; resume with --ckpt_path last",
            name,
            trainer.global_step,
            self._target,
        )
        raise StopRequested(128 + signum)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
