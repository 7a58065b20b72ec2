"""`OvisDataModule`: the checks that keep sharding and accumulation right under several processes,
when `prepare_data` prepares the data again, and that measured prompt lengths are the real ones.

A real (not launched) Lightning `Trainer` with `strategy="ddp", devices=2` gives the data module
the world size and rank it would see in each process.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest

from litovis.data.curate import CurationConfig
from litovis.data.datamodule import BatchingConfig, OvisDataModule, ProcessingConfig
from litovis.data.fetch import FetchOptions
from litovis.data.prepare import PrepareConfig, _write_parquet, is_prepared, load_prepared, run_prepare
from litovis.data.sample import Sample
from litovis.data.sources import SourceSpec
from litovis.training.config import ModelSource
from tests.data.tiny_inputs import write_parquet

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


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_measured_prompt_lengths_are_the_lengths_of_the_prompts_generated(prepared: Path, enable_thinking: bool) -> None:
    def predicting(thinking: bool) -> OvisDataModule:
        module = OvisDataModule(
            source=ModelSource(preset="tiny", tokenizer="tiny"), prepared_dir=str(prepared),
            prompts=str(REPO / "configs/prompts.yaml"), processing=ProcessingConfig(enable_thinking=thinking),
            num_workers=0, predict_split="val",
        )
        module.setup("predict")
        return module

    module = predicting(enable_thinking)
    measured = module._splits["val:generation"]
    produced = {item.id: len(item.input_ids) for batch in module.predict_dataloader() for item in batch}
    assert produced == {s.id: n for s, n in zip(measured.samples, measured.lengths, strict=True)}
    # the setting matters: without thinking the prompt carries the empty think block
    other = predicting(not enable_thinking)._splits["val:generation"].lengths
    assert all(a != b for a, b in zip(measured.lengths, other, strict=True))


def text_only_prepare(tmp_path: Path) -> PrepareConfig:
    """A prepare config of six text-only challenge rows (no images, nothing to fetch)."""
    rows = [{"task": "summarization", "input_type": "text", "input": "bill " + "word " * 5 * i, "question": None,
             "output": f"summary {i}"} for i in range(6)]
    path = write_parquet(rows, tmp_path / "raw.parquet")
    return PrepareConfig(
        sources=[SourceSpec(format="challenge", path=str(path), split="train")],
        output_dir=str(tmp_path / "prepared"), image_dir=str(tmp_path / "images"), prompts=None,
        fetch=FetchOptions(workers=4, progress=False), curation=CurationConfig(val_fraction=0.0),
    )


def prepared_with(cfg: PrepareConfig) -> dict:
    """The config that the prepared files beside `report.json` were written with."""
    return json.loads((Path(cfg.output_dir) / "report.json").read_text())["config"]


def test_data_made_by_litovis_prepare_is_not_prepared_again(tmp_path: Path) -> None:
    cfg = text_only_prepare(tmp_path)
    run_prepare(cfg)  # what `litovis prepare --config ...` does

    OvisDataModule(prepare=cfg).prepare_data()
    faster = replace(cfg, fetch=replace(cfg.fetch, workers=16, progress=True))  # same files, made faster
    OvisDataModule(prepare=faster).prepare_data()
    assert prepared_with(cfg)["fetch"]["workers"] == 4, "prepared again although nothing that shapes the files changed"

    shorter = replace(cfg, curation=replace(cfg.curation, max_chars=30))
    OvisDataModule(prepare=shorter).prepare_data()
    assert prepared_with(cfg)["curation"]["max_chars"] == 30
    assert len(load_prepared(tmp_path / "prepared" / "train.parquet")) < 6  # the longer rows are gone


def test_an_interrupted_prepare_leaves_nothing_that_vouches_for_its_files(tmp_path: Path) -> None:
    cfg = text_only_prepare(tmp_path)
    run_prepare(cfg)
    assert is_prepared(cfg)
    shorter = replace(cfg, curation=replace(cfg.curation, max_chars=30))
    (tmp_path / "prepared" / ".report.json.tmp").mkdir()  # the report cannot be written: the run fails last
    with pytest.raises(OSError):
        run_prepare(shorter)
    assert len(load_prepared(tmp_path / "prepared" / "train.parquet")) < 6  # the files did change
    assert not is_prepared(cfg) and not is_prepared(shorter)
