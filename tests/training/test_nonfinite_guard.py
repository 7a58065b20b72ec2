"""`NonFiniteGuard` on a small regression model: NaN/inf losses and gradients never reach the weights.

NaNs are injected three ways: a forward hook that poisons the hidden output of the batches holding
given sample ids (NaN loss and gradients), a gradient hook (finite loss, inf gradient), and a NaN
constant added to one rank's loss under DDP (non-finite loss, finite all-reduced gradients).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from litovis.training.nonfinite_guard import NonFiniteGuard, NonFiniteTrainingError


class Points(Dataset):
    """`n` samples of a noisy linear target, each with an id `s<i>`."""

    def __init__(self, n: int = 48) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "id": f"s{i}"}


@dataclass
class PointBatch:
    """A batch of points; like litovis's `PackedBatch`, it names its samples in `sample_ids`."""

    x: torch.Tensor
    y: torch.Tensor
    sample_ids: list[str]


def collate(items: list[dict[str, Any]]) -> PointBatch:
    return PointBatch(torch.stack([it["x"] for it in items]), torch.stack([it["y"] for it in items]),
                      [it["id"] for it in items])


class Regressor(L.LightningModule):
    """A two-layer regressor with NaN injection points (see module doc)."""

    def __init__(self, poison_ids: set[str] = frozenset(), grad_poison_steps: set[int] = frozenset(),
                 loss_poison: set[tuple[int, int]] = frozenset()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.poison_ids = set(poison_ids)
        self.grad_poison_steps = set(grad_poison_steps)
        self.loss_poison = set(loss_poison)
        self._batch_ids: list[str] = []
        self.hidden.register_forward_hook(self._poison_hidden)
        self.head.weight.register_hook(self._poison_grad)

    def _poison_hidden(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.poison_ids & set(self._batch_ids):
            return output * float("nan")
        return None

    def _poison_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf") if self.trainer.global_step in self.grad_poison_steps else grad

    def training_step(self, batch: PointBatch, batch_idx: int) -> torch.Tensor:
        self._batch_ids = batch.sample_ids
        loss = (self.head(torch.relu(self.hidden(batch.x))).squeeze(-1) - batch.y).pow(2).mean()
        if (self.trainer.global_rank, self.trainer.global_step) in self.loss_poison:
            loss = loss + torch.tensor(float("nan"))  # no gradient path: only the loss is non-finite
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


class Snapshots(L.Callback):
    """Weights and optimizer state after every optimizer step (index = steps taken); [0] = initial."""

    def __init__(self) -> None:
        self.states: list[tuple[dict, dict]] = []

    def _take(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        optimizer = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
        self.states.append((params, optimizer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == len(self.states):
            self._take(trainer, pl_module)


def _same(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    params_a, opt_a = a
    params_b, opt_b = b
    if any(not torch.equal(params_a[k], params_b[k]) for k in params_a):
        return False
    if opt_a.keys() != opt_b.keys():
        return False
    return all(
        opt_a[i].keys() == opt_b[i].keys() and all(torch.equal(torch.as_tensor(opt_a[i][k]), torch.as_tensor(opt_b[i][k])) for k in opt_a[i])
        for i in opt_a
    )


def train(module: Regressor, guard: NonFiniteGuard | None, steps: int, accumulate: int = 1) -> Snapshots:
    snapshots = Snapshots()
    callbacks = [snapshots] + ([guard] if guard is not None else [])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(Points(), batch_size=4, collate_fn=collate))
    return snapshots


def _all_finite(snapshot: tuple[dict, dict]) -> bool:
    return all(torch.isfinite(v).all() for v in snapshot[0].values())


def test_nan_loss_step_changes_nothing_and_names_its_samples(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    with caplog.at_level(logging.WARNING, logger="litovis.training.nonfinite_guard"):
        snaps = train(Regressor(poison_ids={"s9"}), guard, steps=6)  # s9 is in the third batch (step 2)
    states = snaps.states
    assert len(states) == 7
    assert _same(states[3], states[2]), "the poisoned step must leave weights and AdamW state untouched"
    assert not _same(states[4], states[3]) and not _same(states[2], states[1])
    assert all(_all_finite(s) for s in states)
    assert guard.skipped == 1 and guard.consecutive == 0
    (message,) = [r.getMessage() for r in caplog.records]
    assert "optimizer step 2 skipped (non-finite loss" in message
    assert "['s8', 's9', 's10', 's11']" in message


def test_without_the_guard_the_same_batch_ruins_the_weights() -> None:
    snaps = train(Regressor(poison_ids={"s9"}), None, steps=4)
    assert _all_finite(snaps.states[2]) and not _all_finite(snaps.states[3])


def test_inf_gradient_with_finite_loss_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard()
    with caplog.at_level(logging.WARNING, logger="litovis.training.nonfinite_guard"):
        snaps = train(Regressor(grad_poison_steps={1}), guard, steps=4)
    assert _same(snaps.states[2], snaps.states[1])
    assert all(_all_finite(s) for s in snaps.states) and guard.skipped == 1
    assert "optimizer step 1 skipped (non-finite gradient" in caplog.text


def test_one_bad_micro_batch_skips_its_whole_accumulated_step(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard()
    with caplog.at_level(logging.WARNING, logger="litovis.training.nonfinite_guard"):
        # Two micro-batches of 4 per step: step 1 reads s8-s11 (poisoned) then s12-s15.
        snaps = train(Regressor(poison_ids={"s10"}), guard, steps=4, accumulate=2)
    assert _same(snaps.states[2], snaps.states[1])
    assert not _same(snaps.states[3], snaps.states[2])
    assert all(_all_finite(s) for s in snaps.states) and guard.skipped == 1
    assert "micro-batch 0: sample ids ['s8', 's9', 's10', 's11']" in caplog.text
    assert "s12" not in caplog.text


def test_consecutive_bad_steps_stop_the_run_with_a_clear_message() -> None:
    poisoned = {f"s{i}" for i in range(8, 48)}  # every batch from step 2 on
    snapshots = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=10, callbacks=[snapshots, NonFiniteGuard(max_consecutive=3)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    module = Regressor(poison_ids=poisoned)
    with pytest.raises(NonFiniteTrainingError, match=r"3 optimizer steps in a row \(steps 2-4\)") as info:
        trainer.fit(module, DataLoader(Points(), batch_size=4, collate_fn=collate))
    assert "s16" in str(info.value)  # the last bad step's samples are named
    final = {k: v for k, v in module.state_dict().items()}
    assert all(torch.equal(final[k], snapshots.states[2][0][k]) for k in final), "weights stay those of step 2"


def test_invalid_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    snapshots = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp", max_steps=3, callbacks=[snapshots, NonFiniteGuard()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=True,
    )
    # Only rank 1's loss is NaN at step 1; DDP's all-reduce keeps every gradient finite.
    trainer.fit(Regressor(loss_poison={(1, 1)}), DataLoader(Points(), batch_size=4, collate_fn=collate))
    torch.save([s[0] for s in snapshots.states], Path(out) / f"rank{rank}.pt")
    # Leaving gloo's threads to interpreter shutdown occasionally aborts the process (std::terminate).
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_agree_to_skip(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_ddp_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in (0, 1):
        states = ranks[r]
        assert len(states) == 4
        assert all(torch.equal(states[2][k], states[1][k]) for k in states[1]), f"rank {r} applied the bad step"
        assert not all(torch.equal(states[3][k], states[2][k]) for k in states[2])
    assert all(torch.equal(ranks[0][3][k], ranks[1][3][k]) for k in ranks[0][3]), "the ranks' weights diverged"
