"""`OvisDataModule`: prepared samples → packed, token-budgeted, resumable mixed-task batches.

Notable:
- `prepare_data` runs `litovis prepare` itself when `prepare:` is configured and the prepared files
  are missing or were made with other output-relevant settings (`litovis.data.prepare.is_prepared`
  reads them from the `report.json` that `litovis prepare` writes beside its files).
- The tokenizer and image geometry come from the model's `source` (linked by the CLI), so they
  cannot disagree with the model.
- Every sample is measured exactly up front (text + image headers); over-long train/val samples
  are dropped and reported, test samples are never dropped.
- Training batches pack several samples into one row with no padding, within a token budget, and
  resume mid-epoch exactly (`ResumableDataLoader`); under DDP/FSDP each rank gets its own shard
  (`trainer.use_distributed_sampler: false` is required and checked, as is the trainer's
  `accumulate_grad_batches`, by which the sampler groups micro-batches into optimizer steps).
- Validation shards repeat a few micro-batches so every rank runs the same number of steps (FSDP
  needs it); `val_batch_is_repeat` tells the module which ones to leave out of the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from litovis.data.batching import collate_packed
from litovis.data.dataset import MeasuredSamples, SampleDataset, measure_samples
from litovis.data.drops import DropReport
from litovis.data.loader import ResumableDataLoader
from litovis.data.prepare import PrepareConfig, is_prepared, load_prepared, run_prepare
from litovis.data.prompts import load_templates
from litovis.data.sampler import TokenBudgetBatchSampler
from litovis.inference.prediction_store import StreamingPredictionWriter, completed_ids
from litovis.model.scheduling import BatchBudget, plan_batches
from litovis.processing.processor import OvisProcessor
from litovis.training.config import ModelSource
from litovis.training.graceful_stop import shield_worker_from_stop_signals

log = logging.getLogger(__name__)

@dataclass
class ProcessingConfig:
    """How samples become tokens.

    Attributes:
        min_pixels: smallest resized image area (official: 448·448).
        max_pixels: largest resized image area (official inference 1792·1792; the reference run
            trained with 2,408,448).
        max_length: longest sample in tokens after image expansion; longer train/val samples are
            dropped (never truncated), longer test prompts are an error.
        think_block: `masked` (official: empty think block present, not trained), `trained` or
            `omitted` (ms-swift style).
        enable_thinking: let the model think before answering in generation prompts.
    """

    min_pixels: int = 448 * 448
    max_pixels: int = 1792 * 1792
    max_length: int = 8192
    think_block: str = "masked"
    enable_thinking: bool = False


@dataclass
class BatchingConfig:
    """How samples become batches.

    Attributes:
        max_tokens: token budget of one training micro-batch (all samples packed in one row).
        max_samples: cap on samples per micro-batch (the reference run: 8); None = budget only.
        mixing: `natural` (every sample once per epoch) or `{task: weight}` sampling weights.
        epoch_samples: samples drawn per epoch under weight mixing (default: all).
        bucket_budgets: pack best-fit within buckets of this many budgets (less waste, a little
            less randomness); None = next-fit in shuffled order.
        val_max_tokens: token budget of a validation batch (default: `max_tokens`).
        predict_batch_size: prompts generated together.
        predict_max_tokens: prompt-token budget of one generation batch (prefill memory).
    """

    max_tokens: int = 16384
    max_samples: int | None = None
    mixing: str | dict[str, float] = "natural"
    epoch_samples: int | None = None
    bucket_budgets: int | None = 64
    val_max_tokens: int | None = None
    predict_batch_size: int = 64
    predict_max_tokens: int = 131072


class OvisDataModule(L.LightningDataModule):
    """Mixed-task data for Ovis2.5 fine-tuning and prediction.

    Args:
        source: the model's source (linked from `model.source` by the CLI).
        prepared_dir: directory with `train/val/test.parquet` (default: `prepare.output_dir`).
        prepare: preparation settings; when given, `prepare_data` (re)builds `prepared_dir` as needed.
        prompts: task prompt templates (YAML), used identically for training and inference.
        processing: image and token settings.
        batching: batch formation settings.
        num_workers: DataLoader worker processes (image decoding runs there).
        seed: seed of the training order (same on every rank).
        predict_split: split that `predict` answers: `test` (submission) or `val` (to score with
            `litovis evaluate` against its targets).
    """

    def __init__(
        self,
        source: ModelSource | None = None,
        prepared_dir: str | None = None,
        prepare: PrepareConfig | None = None,
        prompts: str = "configs/prompts.yaml",
        processing: ProcessingConfig | None = None,
        batching: BatchingConfig | None = None,
        num_workers: int = 2,
        seed: int = 42,
        predict_split: str = "test",
    ) -> None:
        super().__init__()
        if predict_split not in ("test", "val"):
            raise ValueError(f"predict_split must be 'test' or 'val', got {predict_split!r}")
        if prepared_dir is None and prepare is None:
            raise ValueError("give data.prepared_dir (prepared parquet files) or data.prepare (how to make them)")
        if prepared_dir is not None and prepare is not None and Path(prepared_dir) != Path(prepare.output_dir):
            raise ValueError(f"data.prepared_dir {prepared_dir} differs from data.prepare.output_dir {prepare.output_dir}")
        self.source = source
        self.prepared_dir = Path(prepared_dir if prepared_dir is not None else prepare.output_dir)
        self.prepare = prepare
        self.prompts = prompts
        self.processing = processing or ProcessingConfig()
        self.batching = batching or BatchingConfig()
        self.num_workers = num_workers
        self.seed = seed
        self.predict_split = predict_split
        self.task_names: list[str] = []
        self.report = DropReport()
        self.processor: OvisProcessor | None = None
        self._splits: dict[str, MeasuredSamples] = {}
        self._train_sampler: TokenBudgetBatchSampler | None = None
        self._val_sampler: TokenBudgetBatchSampler | None = None

    # ----------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        if self.prepare is None or is_prepared(self.prepare):
            return
        log.info("preparing data into %s", self.prepared_dir)
        run_prepare(self.prepare)

    def setup(self, stage: str) -> None:
        if self.processor is None:
            self.processor = build_processor(self.source, self.processing)
        templates = load_templates(self.prompts)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("val",), "predict": (self.predict_split,)}[stage]
        for split in wanted:
            generation = stage == "predict"
            key = f"{split}:generation" if generation else split
            if key in self._splits:
                continue
            path = self.prepared_dir / f"{split}.parquet"
            if not path.exists():
                if split == "val" and stage == "fit":
                    continue
                raise FileNotFoundError(f"{path} not found: run `litovis prepare` or set data.prepare")
            samples = load_prepared(path)
            self._splits[key] = measure_samples(
                samples, self.processor, templates, self.report, generation=generation, stage=f"measure_{key}",
                enable_thinking=self.processing.enable_thinking, **self._measuring_ranks(),
            )
        self.templates = templates
        tasks = {s.task for key, split in self._splits.items() for s in split.samples}
        self.task_names = sorted(tasks)
        if self.report.dropped:
            log.warning("samples dropped while measuring:\n%s", self.report.format_table())

    def _measuring_ranks(self) -> dict[str, Any]:
        """Every rank measures its share of the samples and gathers the rest (`measure_samples`)."""
        world, rank, _ = self._world()
        if world == 1 or not torch.distributed.is_initialized():
            return {}

        def all_gather(mine: list) -> list[list]:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
            return gathered

        return {"rank": rank, "world_size": world, "all_gather": all_gather}

    # ------------------------------------------------------------- training
    def _world(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 1
        return trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches

    def check_trainer_matches(self, trainer: L.Trainer) -> None:
        """Raise unless the trainer shards and accumulates as the training batches were planned.

        Raises:
            ValueError: Lightning's distributed sampler is on under several processes (it cannot
                wrap the token-budget batch sampler, which shards by rank itself), or the batch
                sampler was planned for another world size, rank or `accumulate_grad_batches`.
        """
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "set `trainer.use_distributed_sampler: false`: litovis shards its token-budget batches by "
                f"rank itself, and Lightning's distributed sampler cannot wrap them ({trainer.world_size} processes)"
            )
        sampler = self._train_sampler
        if sampler is None:
            return
        planned = (sampler.num_replicas, sampler.rank, sampler.accumulate)
        actual = (trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches)
        if planned != actual:
            raise ValueError(
                f"the training batches were planned for (world size, rank, accumulate) = {planned} but the "
                f"trainer runs {actual}; `trainer.accumulate_grad_batches` must stay fixed during a run "
                "(the batch sampler groups micro-batches into optimizer steps by it)"
            )

    def val_batch_is_repeat(self, batch_idx: int) -> bool:
        """Whether this rank's validation micro-batch `batch_idx` repeats one of another rank's (the
        shards are padded to equal length); repeats must not count in the metrics."""
        sampler = self._val_sampler
        if sampler is None:
            return False
        return batch_idx * sampler.num_replicas + sampler.rank >= sampler.num_global_batches

    def train_sampler(self) -> TokenBudgetBatchSampler:
        """The training batch sampler (built once; its length sets the LR schedule)."""
        if self._train_sampler is None:
            train = self._splits["train"]
            world, rank, accumulate = self._world()
            self._train_sampler = TokenBudgetBatchSampler(
                train.lengths,
                [s.task for s in train.samples],
                max_tokens=self.batching.max_tokens,
                max_samples=self.batching.max_samples,
                accumulate=accumulate,
                mixing=self.batching.mixing,
                epoch_samples=self.batching.epoch_samples,
                num_targets=train.num_targets,
                shuffle=True,
                bucket_budgets=self.batching.bucket_budgets,
                num_replicas=world,
                rank=rank,
                seed=self.seed,
            )
        return self._train_sampler

    def optimizer_steps_per_epoch(self, accumulate: int) -> int:
        """Optimizer steps in one epoch on each rank."""
        return -(-len(self.train_sampler()) // accumulate)

    def _loader(self, split: str, sampler: TokenBudgetBatchSampler) -> ResumableDataLoader:
        dataset = SampleDataset(self._splits[split].samples, self.processor, self.templates)
        return ResumableDataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=partial(collate_packed, task_vocab=self.task_names),
            num_workers=self.num_workers,
            pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
            persistent_workers=self.num_workers > 0,
            # A stop signal sent to the whole process group must reach the trainer, not kill workers.
            worker_init_fn=shield_worker_from_stop_signals,
            # Own generator: creating worker iterators must not consume the global RNG (dropout).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> ResumableDataLoader:
        sampler = self.train_sampler()
        if self.trainer is not None:
            self.check_trainer_matches(self.trainer)
        return self._loader("train", sampler)

    def val_dataloader(self) -> ResumableDataLoader | list:
        if "val" not in self._splits:
            return []
        val = self._splits["val"]
        world, rank, _ = self._world()
        if self.trainer is not None:
            self.check_trainer_matches(self.trainer)
        sampler = self._val_sampler = TokenBudgetBatchSampler(
            val.lengths,
            [s.task for s in val.samples],
            max_tokens=self.batching.val_max_tokens or self.batching.max_tokens,
            max_samples=self.batching.max_samples,
            num_targets=val.num_targets,
            shuffle=False,
            num_replicas=world,
            rank=rank,
            seed=self.seed,
        )
        return self._loader("val", sampler)

    def test_dataloader(self) -> ResumableDataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Test prompts not yet predicted, longest first, in row and token budgets, sharded by rank.

        Ids already stored by the run's `StreamingPredictionWriter` are skipped, so a rerun of an
        interrupted prediction only does what is missing.
        """
        test = self._splits[f"{self.predict_split}:generation"]
        writer = next((c for c in self.trainer.callbacks if isinstance(c, StreamingPredictionWriter)), None) if self.trainer else None
        done: set[str] = set()
        if writer is not None:
            done = completed_ids(writer.output_dir)
            if writer.expected_ids is None:
                writer.expected_ids = [s.id for s in test.samples]
        todo = [i for i, sample in enumerate(test.samples) if sample.id not in done]
        budget = BatchBudget(self.batching.predict_batch_size, self.batching.predict_max_tokens)
        batches = [[todo[j] for j in batch] for batch in plan_batches([test.lengths[i] for i in todo], budget)]
        world, rank, _ = self._world()
        dataset = SampleDataset(
            test.samples, self.processor, self.templates, generation=True, enable_thinking=self.processing.enable_thinking
        )
        return DataLoader(
            dataset, batch_sampler=PlannedBatches(batches[rank::world]), collate_fn=list, num_workers=self.num_workers
        )


class PlannedBatches(Sampler[list[int]]):
    """A fixed, precomputed list of batches (Lightning wraps batch samplers, so not a plain list)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def build_processor(source: ModelSource | None, processing: ProcessingConfig) -> OvisProcessor:
    """The processor matching `source`: its tokenizer and its ViT's patch geometry."""
    if source is None:
        raise ValueError("data.source is not set: run through the litovis CLI (it links model.source) or pass it")
    from litovis.model.config import OvisConfig
    from litovis.model.presets import preset

    if source.checkpoint is not None:
        from litovis.model.checkpoint import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(source.checkpoint)
        config = OvisConfig.from_file(Path(directory) / "config.json")
    else:
        directory = None
        config = preset(source.preset)
    return OvisProcessor(
        load_tokenizer(source.tokenizer or directory),
        min_pixels=processing.min_pixels,
        max_pixels=processing.max_pixels,
        patch_size=config.vit.patch_size,
        hidden_stride=config.vit.hidden_stride,
        max_length=processing.max_length,
        think_block=processing.think_block,
    )


def load_tokenizer(name: str | Path | None):
    """A tokenizer directory or repo id from the local cache (never the network); `tiny` = built-in."""
    if name is None:
        raise ValueError("no tokenizer: set model.source.tokenizer (or `tiny` with the tiny preset)")
    if str(name) == "tiny":
        from litovis.processing.tiny_tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name), local_files_only=True)
