"""ResumableDataLoader: determinism across workers, step target counts, exact resumption (also
through a real Lightning Trainer killed mid-run and resumed from `last.ckpt`)."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import Dataset

from litovis.data.batching import EncodedSample, PackedBatch, collate_packed
from litovis.data.loader import ResumableDataLoader
from litovis.data.sampler import TokenBudgetBatchSampler
from litovis.model.tokens import IGNORE_INDEX

TASKS = ["vqa", "chat"]
VOCAB = 64


class ToyDataset(Dataset):
    """Sample i: `lengths[i]` tokens, the last `answers[i]` of them targets; logs the indices read.

    Indices in `unloadable` return None, like a dataset whose image fails to decode at train time.
    """

    def __init__(self, lengths: list[int], answers: list[int], unloadable: frozenset[int] = frozenset()):
        self.lengths, self.answers, self.unloadable = lengths, answers, unloadable
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> EncodedSample | None:
        self.reads.append(i)
        if i in self.unloadable:
            return None
        n, a = self.lengths[i], self.answers[i]
        ids = (torch.arange(n) * (i + 3) + i) % (VOCAB - 1) + 1
        labels = ids.clone()
        labels[: n - a] = IGNORE_INDEX
        return EncodedSample(id=f"s{i}", task=TASKS[i % 2], input_ids=ids, labels=labels)


def toy_data(n: int = 41, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    lengths = [rng.randint(6, 40) for _ in range(n)]
    return lengths, [rng.randint(1, n_ - 1) for n_ in lengths]


def make_loader(
    accumulate: int = 2,
    workers: int = 0,
    sampler_targets: bool = True,
    seed: int = 0,
    persistent_workers: bool = False,
) -> ResumableDataLoader:
    lengths, answers = toy_data()
    sampler = TokenBudgetBatchSampler(
        lengths,
        max_tokens=64,
        max_samples=4,
        accumulate=accumulate,
        num_targets=answers if sampler_targets else None,
        seed=seed,
    )
    collate = functools.partial(collate_packed, task_vocab=TASKS)
    return ResumableDataLoader(
        ToyDataset(lengths, answers),
        sampler,
        collate,
        num_workers=workers,
        persistent_workers=persistent_workers,
    )


def signature(batch: PackedBatch) -> tuple:
    return tuple(batch.sample_ids), tuple(batch.input_ids[0].tolist()), batch.step_num_targets


def test_worker_count_does_not_change_batches() -> None:
    runs = []
    for workers, persistent in ((0, False), (1, False), (2, False), (2, True)):
        loader = make_loader(workers=workers, persistent_workers=persistent)
        runs.append([signature(b) for _ in range(2) for b in loader])
    assert runs[0] == runs[1] == runs[2] == runs[3]
    assert len(runs[0]) == 2 * len(make_loader())


def test_each_epoch_covers_every_sample_once_in_a_new_order() -> None:
    loader = make_loader()
    epochs = [[sid for b in loader for sid in b.sample_ids] for _ in range(3)]
    for ids in epochs:
        assert sorted(ids) == sorted(f"s{i}" for i in range(41))
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("sampler_targets", [True, False])
def test_step_num_targets_total_each_optimizer_step(sampler_targets: bool) -> None:
    loader = make_loader(accumulate=4, sampler_targets=sampler_targets)
    batches = list(loader)
    assert len(batches) % 4 != 0, "the scenario must end with a partial step"
    for k, batch in enumerate(batches):
        group = batches[k - k % 4 : k - k % 4 + 4]
        assert batch.step_num_targets == sum(b.num_targets for b in group)


def test_unloadable_sample_keeps_its_place_in_the_planned_step_total() -> None:
    reference = list(make_loader())
    k = next(k for k, b in enumerate(reference) if len(b.sample_ids) > 1)
    victim = int(reference[k].sample_ids[1][1:])
    lengths, answers = toy_data()
    sampler = TokenBudgetBatchSampler(
        lengths, max_tokens=64, max_samples=4, accumulate=2, num_targets=answers
    )
    dataset = ToyDataset(lengths, answers, unloadable=frozenset({victim}))
    batches = list(ResumableDataLoader(dataset, sampler, functools.partial(collate_packed, task_vocab=TASKS)))
    assert batches[k].num_skipped == 1 and f"s{victim}" not in batches[k].sample_ids
    assert batches[k].num_targets < reference[k].num_targets
    assert [b.step_num_targets for b in batches] == [b.step_num_targets for b in reference]


def test_wrong_dataset_target_counts_are_caught() -> None:
    lengths, answers = toy_data()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=64, num_targets=[a + 1 for a in answers])
    loader = ResumableDataLoader(
        ToyDataset(lengths, answers), sampler, functools.partial(collate_packed, task_vocab=TASKS)
    )
    with pytest.raises(ValueError, match="targets"):
        next(iter(loader))


@pytest.mark.parametrize("sampler_targets", [True, False])
@pytest.mark.parametrize("stop_after", [0, 5, 6, 11])
def test_resume_skips_consumed_batches_without_loading_them(sampler_targets: bool, stop_after: int) -> None:
    reference = make_loader(sampler_targets=sampler_targets)
    expected = [signature(b) for _ in range(2) for b in reference]
    per_epoch = len(reference)

    first = make_loader(sampler_targets=sampler_targets)
    seen = [signature(b) for b in first]
    stream = iter(first)  # epoch 1, started lazily: with stop_after=0 the state is "epoch 0 done"
    seen += [signature(next(stream)) for _ in range(stop_after)]
    state = first.state_dict()
    assert state["epoch"] == (0 if stop_after == 0 else 1)

    second = make_loader(sampler_targets=sampler_targets)
    second.load_state_dict(state)
    rest = [signature(b) for b in second]
    assert seen + rest == expected
    skipped = {sid for ids, _, _ in expected[per_epoch : per_epoch + stop_after] for sid in ids}
    read = sorted(f"s{i}" for i in second.dataset.reads)
    assert read == sorted(sid for ids, _, _ in rest for sid in ids)  # only what it yields is loaded
    assert not set(read) & skipped


def test_resume_refuses_changed_setup() -> None:
    state = make_loader(seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_loader(seed=1).load_state_dict(state)


def test_lightning_sees_a_stateful_loader_and_reaches_its_epoch() -> None:
    loader = make_loader()
    assert isinstance(loader, _Stateful)
    stream = iter(loader)  # Lightning calls iter() before set_epoch; the start is lazy
    _set_sampler_epoch(loader, 4)
    assert [b.sample_ids for b in stream] == [
        [f"s{i}" for i in batch] for batch in loader.batch_sampler.plan(4).batches
    ]
    assert loader.state_dict()["epoch"] == 4


def test_trainer_epoch_wins_only_when_it_moves_on() -> None:
    reference = make_loader()
    state = dict(reference.state_dict(), epoch=0, batches_yielded=5)
    early_end = make_loader()  # e.g. limit_train_batches ended epoch 0 at batch 5
    early_end.load_state_dict(state)
    early_end.set_epoch(1)
    epoch1 = reference.batch_sampler.plan(1).batches
    assert [b.sample_ids for b in early_end] == [[f"s{i}" for i in b] for b in epoch1]
    confused = make_loader()
    confused.load_state_dict(state)
    confused.set_epoch(3)
    with pytest.raises(RuntimeError, match="disagree"):
        next(iter(confused))


def test_a_stale_iterator_refuses_to_continue() -> None:
    loader = make_loader()
    old = iter(loader)
    next(old)
    next(iter(loader))
    with pytest.raises(RuntimeError, match="stale"):
        next(old)


# --- A real Trainer: uninterrupted vs. killed and resumed from last.ckpt -------------------------


class Crash(Exception):
    pass


class CrashAtBatch(Callback):
    """Raises before the `at`-th training batch (0-based, counted over the whole run)."""

    def __init__(self, at: int) -> None:
        self.at, self.count = at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.count == self.at:
            raise Crash
        self.count += 1


class Recorder(L.LightningModule):
    """A tiny language model that records each micro-batch's sample ids and loss."""

    def __init__(self, accumulate: int, workers: int) -> None:
        super().__init__()
        self.accumulate, self.workers = accumulate, workers
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)
        self.seen: list[list[str]] = []
        self.losses: list[float] = []

    def train_dataloader(self) -> ResumableDataLoader:
        return make_loader(accumulate=self.accumulate, workers=self.workers)

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        logits = self.head(self.embed(batch.input_ids[0]))
        loss = F.cross_entropy(logits[:-1], batch.labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
        loss = loss / batch.step_num_targets * self.accumulate  # Lightning divides by accumulate
        self.seen.append(batch.sample_ids)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


@pytest.fixture(autouse=True)
def one_thread():
    """The toy model gains nothing from intra-op threads; spinning ones only slow a busy CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(
    tmp: Path, accumulate: int, workers: int, callbacks: list, ckpt: Path | None = None, **limits
) -> Recorder:
    torch.manual_seed(0)
    model = Recorder(accumulate, workers)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=callbacks,
        **limits,
    )
    try:
        trainer.fit(model, ckpt_path=ckpt)
    except Crash:
        pass
    return model


@functools.cache
def uninterrupted(accumulate: int, tmp: Path) -> tuple[list[list[str]], list[float]]:
    model = fit(tmp, accumulate, 0, [], max_epochs=2)
    return model.seen, model.losses


RESUME_CASES = {
    # name: (accumulate, workers, checkpoint options, crash before micro-batch, use max_steps)
    "mid-epoch-1": (2, 0, {"every_n_train_steps": 3}, 33, False),
    "mid-epoch-1-workers": (2, 2, {"every_n_train_steps": 3}, 33, False),
    "mid-epoch-0-no-accumulation": (1, 2, {"every_n_train_steps": 4}, 10, False),
    # Saved by on_train_epoch_end: Lightning does not restore the loader, it only calls set_epoch.
    "epoch-end-checkpoint": (2, 0, {"every_n_epochs": 1}, 30, False),
    # Saved at the epoch's last batch with max_steps: the loader state says "epoch 0 fully yielded".
    "last-batch-checkpoint-max-steps": (2, 2, {"every_n_train_steps": 11}, 28, True),
}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning")
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_trainer_resume_reproduces_uninterrupted_run(case: str, tmp_path_factory) -> None:
    accumulate, workers, ckpt_options, crash_at, by_steps = RESUME_CASES[case]
    per_epoch = len(make_loader(accumulate=accumulate))
    steps_per_epoch = -(-per_epoch // accumulate)
    assert per_epoch == 21 and crash_at < 2 * per_epoch
    limits = {"max_steps": 2 * steps_per_epoch} if by_steps else {"max_epochs": 2}
    full_ids, full_losses = uninterrupted(accumulate, tmp_path_factory.mktemp("full"))
    assert len(full_ids) == 2 * per_epoch

    ckpt_dir = tmp_path_factory.mktemp(case)

    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=ckpt_dir, save_last=True, **ckpt_options)

    crashed = fit(ckpt_dir, accumulate, workers, [checkpoint(), CrashAtBatch(crash_at)], **limits)
    assert len(crashed.seen) == crash_at

    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    step = last["global_step"]
    consumed = (step // steps_per_epoch) * per_epoch + (step % steps_per_epoch) * accumulate
    assert 0 < consumed < crash_at

    resumed = fit(ckpt_dir, accumulate, workers, [checkpoint()], ckpt=ckpt_dir / "last.ckpt", **limits)
    assert crashed.seen[:consumed] + resumed.seen == full_ids
    assert crashed.losses[:consumed] + resumed.losses == pytest.approx(full_losses, rel=1e-6, abs=1e-7)
