"""Token-budget micro-batches: task mixing, seeded shuffling, greedy packing, rank sharding.

Each epoch's plan is a pure function of (lengths, tasks, options, seed, epoch), identical on every
rank, computed from lengths alone (no sample is loaded):

1. Selection: `"natural"` mixing takes every sample once; per-task weights take a fixed number of
   draws split between tasks in proportion to the weights (largest-remainder rounding), each task
   drawn without replacement from a fresh permutation, repeating only when upsampled.
2. Packing: the shuffled selection is packed greedily (next fit) into micro-batches of at most
   `max_tokens` tokens and `max_samples` samples. With `bucket_budgets=B` the shuffled order is
   cut into buckets of about B budgets and each bucket is packed best-fit-decreasing: fuller
   micro-batches, at the price of grouping similar lengths together (which samples share a
   micro-batch becomes length-correlated; which samples share an epoch position stays random,
   because the micro-batches are shuffled again afterwards).
3. Fixed count: Lightning reads the number of batches once per fit, so every epoch has exactly the
   K micro-batches of epoch 0. A shorter epoch splits its most populated micro-batches; a longer
   one empties its least-filled micro-batches into free room elsewhere (best fit). If that fails,
   natural mixing reuses epoch 0's micro-batch shapes, the k-th longest sample taking the place of
   epoch 0's k-th longest (always valid: the lengths are the same multiset); weight mixing leaves
   the fewest draws out and counts them as surplus.
4. Sharding: micro-batch i goes to rank i mod R. With `drop_last=False` the first micro-batches are
   repeated until the count divides by R (every sample is trained at least once); with
   `drop_last=True` trailing micro-batches are dropped so every rank gets whole optimizer steps.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler


@dataclass(frozen=True)
class EpochPlan:
    """One rank's micro-batches of one epoch.

    Attributes:
        epoch: the epoch.
        batches: sample indices of each micro-batch, in order.
        batch_num_targets: targets of each micro-batch (None without per-sample `num_targets`).
        step_num_targets: targets of each micro-batch's optimizer step on this rank, i.e. of the
            `accumulate` consecutive micro-batches it belongs to (None without `num_targets`).
        repeated_batches: micro-batches repeated (over all ranks) to give every rank the same count.
        dropped_samples: samples (over all ranks) left out by `drop_last` or as weight-mixing surplus.
    """

    epoch: int
    batches: list[list[int]]
    batch_num_targets: list[int] | None
    step_num_targets: list[int] | None
    repeated_batches: int
    dropped_samples: int


def _next_fit(
    order: Sequence[int], lengths: Sequence[int], max_tokens: int, max_samples: float
) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    load = 0
    for i in order:
        if current and (load + lengths[i] > max_tokens or len(current) >= max_samples):
            batches.append(current)
            current, load = [], 0
        current.append(i)
        load += lengths[i]
    if current:
        batches.append(current)
    return batches


def _best_fit(
    items: Sequence[int],
    batches: list[list[int]],
    lengths: Sequence[int],
    max_tokens: int,
    max_samples: float,
    allow_new: bool,
) -> bool:
    """Put each item into the open batch with the least room that still fits it (in place).

    Returns False if an item fits nowhere and `allow_new` is False (`batches` is then partly filled).
    """
    open_room: list[tuple[int, int]] = sorted(
        (max_tokens - sum(lengths[i] for i in b), k) for k, b in enumerate(batches) if len(b) < max_samples
    )
    for i in items:
        pos = bisect_left(open_room, (lengths[i], -1))
        if pos < len(open_room):
            room, k = open_room.pop(pos)
        elif allow_new:
            room, k = max_tokens, len(batches)
            batches.append([])
        else:
            return False
        batches[k].append(i)
        room -= lengths[i]
        if room > 0 and len(batches[k]) < max_samples:
            insort(open_room, (room, k))
    return True


def _decreasing(items: Sequence[int], lengths: Sequence[int]) -> list[int]:
    return sorted(items, key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order


def _split_until(batches: list[list[int]], count: int) -> None:
    """Split the most populated micro-batches in two until there are `count` of them (in place)."""
    heap = [(-len(b), k) for k, b in enumerate(batches)]
    heapq.heapify(heap)
    while len(batches) < count:
        size, k = heapq.heappop(heap)
        if size > -2:
            raise AssertionError("cannot split single-sample micro-batches")
        batch = batches[k]
        batches[k], new = batch[0::2], batch[1::2]
        batches.append(new)
        heapq.heappush(heap, (-len(batches[k]), k))
        heapq.heappush(heap, (-len(new), len(batches) - 1))


def _merge_down_to(
    batches: list[list[int]], count: int, lengths: Sequence[int], max_tokens: int, max_samples: float
) -> list[list[int]] | None:
    """Empty the least-filled micro-batches into the others' free room; None if it does not fit."""
    by_load = sorted(range(len(batches)), key=lambda k: sum(lengths[i] for i in batches[k]))
    excess = len(batches) - count
    emptied = set(by_load[:excess])
    kept = [list(b) for k, b in enumerate(batches) if k not in emptied]
    pool = _decreasing([i for k in sorted(emptied) for i in batches[k]], lengths)
    return kept if _best_fit(pool, kept, lengths, max_tokens, max_samples, allow_new=False) else None


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yields micro-batches (lists of sample indices) that fit a token budget; see the module doc.

    Args:
        lengths: tokens of each sample, visual spans included.
        tasks: task name of each sample (required for weight mixing).
        max_tokens: token budget of one micro-batch.
        max_samples: optional cap on samples per micro-batch.
        accumulate: micro-batches per optimizer step (must equal the Trainer's
            `accumulate_grad_batches`); groups `step_num_targets`.
        mixing: `"natural"` (every sample once per epoch) or `{task: weight}` for every task present
            (weight 0 excludes a task).
        epoch_samples: draws per epoch under weight mixing (default: number of samples).
        num_targets: optional loss-taking tokens of each sample, for `EpochPlan.step_num_targets`.
        shuffle: shuffle samples and micro-batches (required for weight mixing).
        bucket_budgets: pack best-fit-decreasing within buckets of this many budgets (None: next fit
            in shuffled order).
        drop_last: drop trailing micro-batches instead of repeating leading ones under sharding.
        num_replicas: number of ranks (DDP); requires `Trainer(use_distributed_sampler=False)`.
        rank: this rank.
        seed: seed of every epoch's order (same on all ranks).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        tasks: Sequence[str] | None = None,
        *,
        max_tokens: int,
        max_samples: int | None = None,
        accumulate: int = 1,
        mixing: str | Mapping[str, float] = "natural",
        epoch_samples: int | None = None,
        num_targets: Sequence[int] | None = None,
        shuffle: bool = True,
        bucket_budgets: int | None = None,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        n = len(self.lengths)
        if n == 0:
            raise ValueError("no samples to batch")
        for name, seq in (("tasks", tasks), ("num_targets", num_targets)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries but lengths has {n}")
        if max_tokens < 1 or (max_samples is not None and max_samples < 1) or accumulate < 1:
            raise ValueError("max_tokens, max_samples and accumulate must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if bucket_budgets is not None and bucket_budgets < 1:
            raise ValueError("bucket_budgets must be >= 1 or None")
        bad = [i for i, length in enumerate(self.lengths) if not 0 < length <= max_tokens]
        if bad:
            i = bad[0]
            raise ValueError(
                f"{len(bad)} sample(s) do not fit max_tokens={max_tokens} (first: index {i}, "
                f"{self.lengths[i]} tokens); the data layer must drop over-long samples before batching"
            )
        self.tasks = list(tasks) if tasks is not None else None
        self.max_tokens = max_tokens
        self.max_samples = max_samples
        self.accumulate = accumulate
        self.num_targets = [int(t) for t in num_targets] if num_targets is not None else None
        self.shuffle = shuffle
        self.bucket_budgets = bucket_budgets
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.mixing = mixing
        self._task_pools = self._check_mixing(mixing)
        self.epoch_samples = n if epoch_samples is None else epoch_samples
        if self.epoch_samples < 1:
            raise ValueError("epoch_samples must be >= 1")
        if self._task_pools is None and epoch_samples not in (None, n):
            raise ValueError("epoch_samples only applies to weight mixing; natural mixing takes every sample")
        self._epoch = 0
        self._start = 0
        self._epoch0: list[list[int]] | None = None
        self._plans: dict[int, EpochPlan] = {}

    def _check_mixing(self, mixing: str | Mapping[str, float]) -> dict[str, tuple[float, list[int]]] | None:
        if isinstance(mixing, str):
            if mixing != "natural":
                raise ValueError(f"mixing must be 'natural' or a {{task: weight}} mapping, got {mixing!r}")
            return None
        if self.tasks is None:
            raise ValueError("weight mixing needs the task of every sample")
        if not self.shuffle:
            raise ValueError("weight mixing draws samples at random; it needs shuffle=True")
        members: dict[str, list[int]] = {}
        for i, task in enumerate(self.tasks):
            members.setdefault(task, []).append(i)
        missing = sorted(set(members) - set(mixing))
        unknown = sorted(set(mixing) - set(members))
        if missing or unknown:
            raise ValueError(
                f"mixing weights must name exactly the tasks present: missing {missing} (give weight 0 "
                f"to exclude), unknown {unknown}"
            )
        if any(w < 0 for w in mixing.values()) or sum(mixing.values()) <= 0:
            raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {dict(mixing)}")
        return {task: (float(mixing[task]), members[task]) for task in sorted(members) if mixing[task] > 0}

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, stream])

    def _selection(self, epoch: int) -> list[int]:
        rng = self._rng(epoch, 0)
        if self._task_pools is None:
            n = len(self.lengths)
            return rng.permutation(n).tolist() if self.shuffle else list(range(n))
        total = sum(w for w, _ in self._task_pools.values())
        shares = {t: self.epoch_samples * w / total for t, (w, _) in self._task_pools.items()}
        quota = {t: int(s) for t, s in shares.items()}
        by_remainder = sorted(shares, key=lambda t: (-(shares[t] - quota[t]), t))
        for t in by_remainder[: self.epoch_samples - sum(quota.values())]:
            quota[t] += 1
        chosen: list[int] = []
        for t, (_, pool) in self._task_pools.items():
            need = quota[t]
            while need > 0:
                take = min(need, len(pool))
                chosen.extend(pool[j] for j in rng.permutation(len(pool))[:take])
                need -= take
        return rng.permutation(np.array(chosen, dtype=np.int64)).tolist()

    def _pack(self, order: Sequence[int]) -> list[list[int]]:
        max_samples = self.max_samples or float("inf")
        if self.bucket_budgets is None:
            return _next_fit(order, self.lengths, self.max_tokens, max_samples)
        bucket_tokens = self.bucket_budgets * self.max_tokens
        batches: list[list[int]] = []
        start, load = 0, 0
        for pos, i in enumerate(order):
            load += self.lengths[i]
            if load >= bucket_tokens or pos == len(order) - 1:
                bucket: list[list[int]] = []
                items = _decreasing(order[start : pos + 1], self.lengths)
                _best_fit(items, bucket, self.lengths, self.max_tokens, max_samples, allow_new=True)
                batches.extend(bucket)
                start, load = pos + 1, 0
        return batches

    def _template(self) -> list[list[int]]:
        """Epoch 0's packing, before any adjustment; its size is the fixed count K."""
        if self._epoch0 is None:
            self._epoch0 = self._pack(self._selection(0))
            if self.drop_last and len(self._epoch0) < self.num_replicas * self.accumulate:
                raise ValueError(
                    f"only {len(self._epoch0)} micro-batches per epoch: too few for {self.num_replicas} "
                    f"rank(s) x accumulate {self.accumulate} with drop_last=True"
                )
        return self._epoch0

    @property
    def num_global_batches(self) -> int:
        """Micro-batches per epoch over all ranks, before sharding (the fixed K of the module doc)."""
        return len(self._template())

    def _from_template(self, selection: Sequence[int]) -> list[list[int]]:
        """Epoch 0's micro-batch shapes filled with `selection`: the k-th longest sample takes the
        place of epoch 0's k-th longest. Valid whenever the multiset of lengths is epoch 0's."""
        epoch0 = _decreasing(self._selection(0), self.lengths)
        slot = dict(zip(epoch0, _decreasing(selection, self.lengths), strict=True))
        return [[slot[i] for i in batch] for batch in self._template()]

    def _global_batches(self, epoch: int) -> tuple[list[list[int]], int]:
        """Exactly `num_global_batches` micro-batches for `epoch`, and the surplus draws left out."""
        count = self.num_global_batches
        selection = self._selection(epoch)
        batches = self._template() if epoch == 0 else self._pack(selection)
        batches = [list(b) for b in batches]
        surplus = 0
        if len(batches) > count:
            max_samples = self.max_samples or float("inf")
            merged = _merge_down_to(batches, count, self.lengths, self.max_tokens, max_samples)
            if merged is not None:
                batches = merged
            elif self._task_pools is None:  # natural mixing: every epoch has epoch 0's lengths
                batches = self._from_template(selection)
            else:  # weight mixing: the draws differ per epoch; leave the fewest draws out
                batches.sort(key=len, reverse=True)
                surplus = sum(len(b) for b in batches[count:])
                batches = batches[:count]
        if len(batches) < count:
            _split_until(batches, count)
        if self.shuffle:
            batches = [batches[k] for k in self._rng(epoch, 1).permutation(len(batches))]
        return batches, surplus

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (the same on every rank and in every epoch)."""
        count, replicas = self.num_global_batches, self.num_replicas
        if self.drop_last:
            return count // (replicas * self.accumulate) * self.accumulate
        return (count + replicas - 1) // replicas

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's micro-batches of `epoch` (cached)."""
        if epoch not in self._plans:
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = self._build_plan(epoch)
        return self._plans[epoch]

    def _build_plan(self, epoch: int) -> EpochPlan:
        batches, dropped = self._global_batches(epoch)
        used = len(self) * self.num_replicas
        repeated = max(0, used - len(batches))
        dropped += sum(len(b) for b in batches[used:])
        batches = [batches[j % len(batches)] for j in range(used)]
        mine = batches[self.rank :: self.num_replicas]
        batch_targets = step_targets = None
        if self.num_targets is not None:
            batch_targets = [sum(self.num_targets[i] for i in b) for b in mine]
            step_targets = []
            for first in range(0, len(mine), self.accumulate):
                step = batch_targets[first : first + self.accumulate]
                step_targets.extend([sum(step)] * len(step))
        return EpochPlan(epoch, mine, batch_targets, step_targets, repeated, dropped)

    @property
    def epoch(self) -> int:
        """Epoch that the next `__iter__` yields."""
        return self._epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make iterations yield `epoch`'s micro-batches from position `start` on, until the next call.

        `start > 0` resumes mid-epoch: the skipped micro-batches are never handed to the DataLoader,
        so their samples are not loaded. (The start persists because a multi-worker DataLoader
        iterator calls `iter()` on its batch sampler twice when it starts.)
        """
        if not 0 <= start <= len(self):
            raise ValueError(f"start {start} is outside 0..{len(self)}")
        self._epoch, self._start = epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        # Eager on purpose: the plan is fixed when the DataLoader asks for the iterator, so later
        # set_epoch calls cannot change an iteration already prefetched by workers.
        return iter(self.plan(self._epoch).batches[self._start :])
