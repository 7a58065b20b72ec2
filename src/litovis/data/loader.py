"""A DataLoader over token-budget micro-batches that resumes mid-epoch exactly, without torchdata.

How Lightning 2.6 drives it (read from its source):

- Saving: `FitLoop.on_save_checkpoint` stores `[loader.state_dict()]` for every loader that passes
  `isinstance(loader, _Stateful)` (has `state_dict`/`load_state_dict`) under
  `loops.fit_loop.state_dict.combined_loader`, in every checkpoint.
- Restoring: `FitLoop.setup_data` builds the loader, reads `len()`, then calls `load_state_dict`
  only when the fit loop is `restarting` (the checkpoint's epoch was unfinished, or `max_steps` is
  set), and only then calls `iter()`. The epoch loop then restores `batch_progress` and counts the
  batches already seen, so the loader must yield only the rest of the epoch and keep `len()` whole.
- Epochs: at every epoch start (after that first `iter()`, before the first `next()`) Lightning
  calls `set_epoch(current epoch)` on `loader.sampler` and `loader.batch_sampler.sampler` only, never
  on the batch sampler itself. This loader therefore stands an epoch hook in as `loader.sampler`,
  and decides the epoch lazily at the first `next()`: Lightning's epoch wins, which also covers a
  resume from an end-of-epoch checkpoint (where `load_state_dict` is not called at all). Without
  Lightning the loader counts epochs itself: a new iteration after one that yielded batches is the
  next epoch.
- Distributed: Lightning's sampler injection cannot wrap a token-budget batch sampler (it raises a
  TypeError); run DDP with `Trainer(use_distributed_sampler=False)` and give the batch sampler
  `num_replicas`/`rank`.
- Counting: with a known length Lightning's fetcher does not prefetch, and worker prefetching
  happens below this loader's iterator, so the state counts batches handed to the training loop.

State: `{seed, epoch, batches_yielded, num_batches, step_prefix_targets}`. On restore the next
iteration tells the batch sampler to start at `batches_yielded`: skipped micro-batches never reach
the workers. The loader also sets `step_num_targets` on each batch: from the sampler's plan
(checked against the batch's own `num_targets`; a sample the dataset failed to load still counts in
the planned total), or, without per-sample counts, by reading ahead the rest of the optimizer step.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler

from litovis.data.batching import PackedBatch
from litovis.data.sampler import TokenBudgetBatchSampler


class _LightningEpochHook(Sampler[int]):
    """What Lightning sees as `loader.sampler`: forwards `set_epoch` to the loader.

    Iterating it behaves like the DataLoader's default sequential sampler, which a DataLoader with a
    batch sampler never uses. It holds the loader weakly: a reference cycle would leave the loader
    to the cyclic garbage collector, which tears down worker queues in an order that makes
    persistent workers time out instead of exiting.
    """

    def __init__(self, loader: ResumableDataLoader, default: Sampler[int]) -> None:
        self._loader = weakref.ref(loader)
        self._default = default

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self._default)

    def __len__(self) -> int:
        return len(self._default)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """DataLoader over a `TokenBudgetBatchSampler` with exact mid-epoch resumption (see module doc).

    Args:
        dataset: map-style dataset; item i is the sample of index i of the batch sampler.
        batch_sampler: the token-budget batch sampler (it owns seed, sharding and accumulation).
        collate_fn: turns a list of items into a `PackedBatch`, i.e.
            `functools.partial(collate_packed, task_vocab=...)`.
        **kwargs: other DataLoader arguments (`num_workers`, `pin_memory`, `persistent_workers`,
            ...); `in_order=False` is refused because resumption counts batches in sampler order.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: TokenBudgetBatchSampler,
        collate_fn: Callable[[list[Any]], PackedBatch],
        **kwargs: Any,
    ) -> None:
        if not isinstance(batch_sampler, TokenBudgetBatchSampler):
            raise TypeError(
                f"batch_sampler must be a TokenBudgetBatchSampler, got {type(batch_sampler).__name__}"
            )
        if kwargs.get("in_order", True) is not True:
            raise ValueError("in_order=False reorders batches; exact resumption needs sampler order")
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, **kwargs)
        self._epoch = 0  # epoch of the latest iteration
        self._yielded = 0  # batches of that epoch handed out (a resumed iteration starts above 0)
        self._step_prefix = 0  # targets of the current optimizer step's batches already handed out
        self._resume_pending = False
        self._requested_epoch: int | None = None
        # Weak, so that workers shut down as soon as the training loop drops its iterator, as with
        # a plain DataLoader.
        self._active: weakref.ref[_TrackedIterator] | None = None

    @property  # type: ignore[override]
    def sampler(self) -> Sampler[int]:
        return self._epoch_hook

    @sampler.setter
    def sampler(self, value: Sampler[int]) -> None:
        # DataLoader.__init__ assigns its default sampler here; DataLoader forbids later changes.
        self._epoch_hook = _LightningEpochHook(self, value)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration that starts yield `epoch` (Lightning calls this every epoch)."""
        self._requested_epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Position in the batch stream: epoch and batches handed to the training loop."""
        return {
            "seed": self.batch_sampler.seed,
            "epoch": self._epoch,
            "batches_yielded": self._yielded,
            "num_batches": len(self),
            "step_prefix_targets": self._step_prefix,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume from `state_dict` at the next iteration (skipping at the sampler, loading nothing)."""
        mismatched = {
            key: (state_dict[key], now)
            for key, now in (("seed", self.batch_sampler.seed), ("num_batches", len(self)))
            if state_dict[key] != now
        }
        if mismatched:
            details = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in mismatched.items())
            raise ValueError(
                f"cannot resume the data stream exactly ({details}); the data or batching options changed"
            )
        self._epoch = int(state_dict["epoch"])
        self._yielded = int(state_dict["batches_yielded"])
        self._step_prefix = int(state_dict["step_prefix_targets"])
        self._resume_pending = True

    def _start_position(self) -> tuple[int, int]:
        """(epoch, first batch) of the iteration that starts now; consumes pending requests."""
        if self._resume_pending:
            epoch, start = self._epoch, self._yielded
        elif self._yielded > 0:
            epoch, start = self._epoch + 1, 0
        else:
            epoch, start = self._epoch, 0
        if start >= len(self):
            epoch, start = epoch + 1, 0
        requested, self._requested_epoch = self._requested_epoch, None
        if requested is not None and requested != epoch:
            # The trainer may end an epoch early (limit_train_batches): moving on is fine; any
            # other disagreement with a restored mid-epoch position would corrupt the order.
            if self._resume_pending and start > 0 and requested != epoch + 1:
                raise RuntimeError(
                    f"the loader state resumes epoch {epoch} at batch {start}, but the trainer starts "
                    f"epoch {requested}; the checkpoint's loop and loader states disagree"
                )
            epoch, start = requested, 0
        self._resume_pending = False
        if start == 0:
            self._step_prefix = 0
        return epoch, start

    def __iter__(self) -> Iterator[Any]:
        iterator = _TrackedIterator(self)
        self._active = weakref.ref(iterator)
        return iterator

    def _open(self) -> Iterator[Any]:
        """Start the underlying DataLoader iteration at the position decided now."""
        epoch, start = self._start_position()
        self._epoch, self._yielded = epoch, start
        self.batch_sampler.set_epoch(epoch, start)
        return super().__iter__()


class _TrackedIterator(Iterator[PackedBatch]):
    """Counts handed-out batches on the loader and attaches `step_num_targets`.

    Starts the underlying iteration at the first `next()`, after Lightning's `set_epoch`.
    """

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader = loader
        self._inner: Iterator[Any] | None = None
        self._ahead: deque[PackedBatch] = deque()

    def __iter__(self) -> _TrackedIterator:
        return self

    def __next__(self) -> PackedBatch:
        loader = self._loader
        if loader._active is None or loader._active() is not self:
            raise RuntimeError(
                "a newer iteration over this ResumableDataLoader started; this iterator is stale"
            )
        if self._inner is None:
            self._inner = loader._open()
        sampler: TokenBudgetBatchSampler = loader.batch_sampler
        plan = sampler.plan(loader._epoch)
        position = loader._yielded
        batch = self._ahead.popleft() if self._ahead else next(self._inner)
        if plan.step_num_targets is not None:
            expected = plan.batch_num_targets[position]  # type: ignore[index]
            # A sample the dataset failed to load still counts in its step's planned total: that
            # step's loss is scaled down by the missing share, never up.
            wrong = batch.num_targets > expected if batch.num_skipped else batch.num_targets != expected
            if wrong:
                raise ValueError(
                    f"micro-batch {position} of epoch {loader._epoch} has {batch.num_targets} targets but "
                    f"the sampler's num_targets add up to {expected}; the dataset's counts are wrong"
                )
            step_total = plan.step_num_targets[position]
        else:
            step_total = self._read_ahead(batch, position, len(loader))
        batch.step_num_targets = step_total
        last_of_step = (position + 1) % sampler.accumulate == 0
        loader._step_prefix = 0 if last_of_step else loader._step_prefix + batch.num_targets
        loader._yielded = position + 1
        if loader._yielded == len(loader):
            self._finish()
        return batch

    def _finish(self) -> None:
        # Lightning knows the length and never asks past the last batch; ending the underlying
        # iteration here lets worker processes exit now rather than at garbage collection.
        assert self._inner is not None and not self._ahead
        if next(self._inner, None) is not None:
            raise RuntimeError("the DataLoader produced a batch beyond the sampler's plan")

    def _read_ahead(self, batch: PackedBatch, position: int, num_batches: int) -> int:
        """Targets of `batch`'s optimizer step: those already handed out, this batch's, and those
        of the step's later batches, which are read ahead (and kept) here."""
        accumulate = self._loader.batch_sampler.accumulate
        step_end = min((position // accumulate + 1) * accumulate, num_batches)
        assert self._inner is not None
        while len(self._ahead) < step_end - position - 1:
            self._ahead.append(next(self._inner))
        ahead = sum(b.num_targets for b in self._ahead)
        return self._loader._step_prefix + batch.num_targets + ahead
