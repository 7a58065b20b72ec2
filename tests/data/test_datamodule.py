"""`OvisDataModule` under several processes: the checks that keep sharding and accumulation right.

A real (not launched) Lightning `Trainer` with `strategy="ddp", devices=2` gives the data module
the world size and rank it would see in each process.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from litovis.data.datamodule import BatchingConfig, OvisDataModule
from litovis.data.prepare import _write_parquet
from litovis.data.sample import Sample
from litovis.training.config import ModelSource

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared directory of text conversations: 12 train and 5 validation samples."""
    root = tmp_path_factory.mktemp("prepared")
    for split, count in (("train", 12), ("val", 5)):
        samples = [
            Sample(id=f"{split}-{i}", task="chat", source=f"test:{i}", messages=[
                {"role": "user", "content": "word " * (3 + i)},
                {"role": "assistant", "content": "answer " * (2 + i % 3)},
            ])
            for i in range(count)
        ]
        _write_parquet(samples, root / f"{split}.parquet")
    return root


def datamodule(prepared: Path, trainer: L.Trainer | None = None) -> OvisDataModule:
    module = OvisDataModule(
        source=ModelSource(preset="tiny", tokenizer="tiny"), prepared_dir=str(prepared),
        prompts=str(REPO / "configs/prompts.yaml"), batching=BatchingConfig(max_tokens=256, max_samples=1),
        num_workers=0,
    )
    module.setup("fit")
    if trainer is not None:
        module.trainer = trainer
    return module


def ddp_trainer(rank: int = 0, **kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, **kwargs)
    trainer.strategy.cluster_environment.set_global_rank(rank)
    assert (trainer.world_size, trainer.global_rank) == (2, rank)
    return trainer


def test_lightning_distributed_sampler_is_refused_with_several_processes(prepared: Path) -> None:
    module = datamodule(prepared, ddp_trainer(use_distributed_sampler=True))
    with pytest.raises(ValueError, match="use_distributed_sampler: false"):
        module.train_dataloader()
    with pytest.raises(ValueError, match="use_distributed_sampler: false"):
        module.val_dataloader()
    assert datamodule(prepared, ddp_trainer(use_distributed_sampler=False)).train_dataloader() is not None


def test_accumulation_must_match_the_planned_optimizer_steps(prepared: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    module = datamodule(prepared, trainer)
    assert module.train_sampler().accumulate == 2
    module.check_trainer_matches(trainer)
    trainer.accumulate_grad_batches = 3  # e.g. a GradientAccumulationScheduler at an epoch start
    with pytest.raises(ValueError, match=r"accumulate\) = \(1, 0, 2\) but the trainer runs \(1, 0, 3\)"):
        module.check_trainer_matches(trainer)

    early = datamodule(prepared)
    early.optimizer_steps_per_epoch(1)  # planned before any trainer was attached: accumulate 1
    early.trainer = L.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=4, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        early.train_dataloader()


def test_each_validation_batch_counts_on_exactly_one_rank(prepared: Path) -> None:
    counted: list[list[int]] = []
    flagged = 0
    for rank in (0, 1):
        module = datamodule(prepared, ddp_trainer(rank, use_distributed_sampler=False))
        loader = module.val_dataloader()
        batches = loader.batch_sampler.plan(0).batches
        assert len(batches) == 3  # 5 single-sample batches over 2 ranks: one rank repeats one
        for index, batch in enumerate(batches):
            if module.val_batch_is_repeat(index):
                flagged += 1
            else:
                counted.append(batch)
    assert flagged == 1
    assert sorted(i for batch in counted for i in batch) == list(range(5))
