"""Token-budget batch sampler: budgets, coverage, sharding, mixing, determinism, fixed epoch length."""

from __future__ import annotations

import random
from collections import Counter

import pytest

import litovis.data.sampler as sampler_module
from litovis.data.sampler import TokenBudgetBatchSampler


def random_lengths(n: int, seed: int, low: int = 5, high: int = 120) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


CONFIGS = [
    {"max_tokens": 128},
    {"max_tokens": 128, "max_samples": 3},
    {"max_tokens": 128, "bucket_budgets": 4},
    {"max_tokens": 128, "max_samples": 4, "bucket_budgets": 8},
]


@pytest.mark.parametrize("options", CONFIGS)
def test_budget_cap_and_exactly_once_every_epoch(options: dict) -> None:
    lengths = random_lengths(300, seed=1)
    sampler = TokenBudgetBatchSampler(lengths, seed=3, **options)
    for epoch in range(6):
        batches = sampler.plan(epoch).batches
        assert len(batches) == len(sampler)  # fixed epoch length, whatever the packing did
        for batch in batches:
            assert sum(lengths[i] for i in batch) <= options["max_tokens"]
            assert len(batch) <= options.get("max_samples", len(lengths))
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))


def test_fallback_to_epoch0_shapes_keeps_every_invariant(monkeypatch) -> None:
    """When freeing micro-batches fails, natural mixing reuses epoch 0's shapes with new samples."""
    monkeypatch.setattr(sampler_module, "_merge_down_to", lambda *args: None)
    lengths = random_lengths(200, seed=2, low=20, high=70)
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=128, seed=0)
    first = sampler.plan(0).batches
    fell_back = 0
    for epoch in range(1, 12):
        batches = sampler.plan(epoch).batches
        fell_back += len(sampler._pack(sampler._selection(epoch))) > len(sampler)
        assert len(batches) == len(first)
        assert all(sum(lengths[i] for i in b) <= 128 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(200))
    assert fell_back > 0, "the scenario must exercise the fallback"


def test_over_long_sample_is_an_error_not_a_drop() -> None:
    with pytest.raises(ValueError, match=r"index 2, 300 tokens"):
        TokenBudgetBatchSampler([10, 20, 300, 40], max_tokens=256)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_gives_disjoint_equal_shards(drop_last: bool) -> None:
    lengths = random_lengths(203, seed=4)
    replicas = 3
    shards = [
        TokenBudgetBatchSampler(
            lengths, max_tokens=128, num_replicas=replicas, rank=r, seed=9, drop_last=drop_last, accumulate=2
        )
        for r in range(replicas)
    ]
    assert len({len(s) for s in shards}) == 1
    if drop_last:
        assert len(shards[0]) % 2 == 0  # whole optimizer steps on every rank
    for epoch in (0, 1):
        plans = [s.plan(epoch) for s in shards]
        seen = [i for p in plans for b in p.batches for i in b]
        counts = Counter(seen)
        if drop_last:
            assert max(counts.values()) == 1
            assert len(seen) + plans[0].dropped_samples == len(lengths)
        else:
            assert set(counts) == set(range(len(lengths)))
            repeated = plans[0].repeated_batches
            assert repeated == len(shards[0]) * replicas - shards[0].num_global_batches
            # Repeated micro-batches are the only duplicates, each at most once.
            assert max(counts.values()) <= 2
            assert (len(seen) > len(lengths)) == (repeated > 0)


def test_weight_mixing_follows_weights() -> None:
    tasks = ["a"] * 100 + ["b"] * 300 + ["c"] * 600 + ["d"] * 50
    lengths = random_lengths(len(tasks), seed=5)
    weights = {"a": 1.0, "b": 1.0, "c": 2.0, "d": 0.0}
    sampler = TokenBudgetBatchSampler(
        lengths, tasks, max_tokens=128, mixing=weights, epoch_samples=1000, seed=1
    )
    for epoch in range(3):
        plan = sampler.plan(epoch)
        drawn = [i for b in plan.batches for i in b]
        counts = Counter(tasks[i] for i in drawn)
        assert counts["d"] == 0
        assert abs(len(drawn) - 1000) <= plan.dropped_samples + 10
        for task, expected in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
            assert abs(counts[task] / len(drawn) - expected) < 0.02
        # A downsampled task is drawn without replacement; an upsampled one covers all its samples.
        b_drawn = [i for i in drawn if tasks[i] == "b"]
        assert len(b_drawn) == len(set(b_drawn))
        assert {i for i in drawn if tasks[i] == "a"} == set(range(100))
        assert all(sum(lengths[i] for i in b) <= 128 for b in plan.batches)
        assert len(plan.batches) == len(sampler)


def test_weight_mixing_is_validated() -> None:
    tasks = ["a", "b", "a"]
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        TokenBudgetBatchSampler([5, 5, 5], tasks, max_tokens=16, mixing={"a": 1.0})
    with pytest.raises(ValueError, match=r"unknown \['z'\]"):
        TokenBudgetBatchSampler([5, 5, 5], tasks, max_tokens=16, mixing={"a": 1.0, "b": 1.0, "z": 1.0})
    with pytest.raises(ValueError, match="shuffle"):
        TokenBudgetBatchSampler([5, 5, 5], tasks, max_tokens=16, mixing={"a": 1, "b": 1}, shuffle=False)
    with pytest.raises(ValueError, match="natural"):
        TokenBudgetBatchSampler([5, 5, 5], tasks, max_tokens=16, mixing="uniform")


def test_order_is_a_function_of_seed_and_epoch() -> None:
    lengths = random_lengths(150, seed=6)
    a = TokenBudgetBatchSampler(lengths, max_tokens=128, seed=11, bucket_budgets=4)
    b = TokenBudgetBatchSampler(lengths, max_tokens=128, seed=11, bucket_budgets=4)
    c = TokenBudgetBatchSampler(lengths, max_tokens=128, seed=12, bucket_budgets=4)
    assert a.plan(0).batches == b.plan(0).batches and a.plan(3).batches == b.plan(3).batches
    assert a.plan(0).batches != a.plan(1).batches
    assert a.plan(0).batches != c.plan(0).batches
    a.set_epoch(3)
    assert list(a) == b.plan(3).batches
    a.set_epoch(3, start=5)
    assert list(a) == b.plan(3).batches[5:] == list(a)


def test_no_shuffle_keeps_index_order() -> None:
    lengths = [30, 30, 30, 100, 10, 10]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=100, shuffle=False)
    assert sampler.plan(0).batches == [[0, 1, 2], [3], [4, 5]] == sampler.plan(1).batches


def test_step_num_targets_sum_each_optimizer_step() -> None:
    lengths = random_lengths(120, seed=7)
    targets = [n // 3 for n in lengths]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=128, accumulate=3, num_targets=targets, seed=2)
    plan = sampler.plan(1)
    assert len(plan.batches) % 3 != 0, "the scenario must end with a partial optimizer step"
    per_batch = [sum(targets[i] for i in b) for b in plan.batches]
    assert plan.batch_num_targets == per_batch
    for k in range(len(plan.batches)):
        first = k - k % 3
        assert plan.step_num_targets[k] == sum(per_batch[first : first + 3])
    assert TokenBudgetBatchSampler(lengths, max_tokens=128).plan(0).step_num_targets is None


def test_step_num_targets_are_per_rank() -> None:
    lengths = random_lengths(90, seed=8)
    targets = [1] * 90
    for rank in (0, 1):
        sampler = TokenBudgetBatchSampler(
            lengths, max_tokens=128, accumulate=2, num_targets=targets, num_replicas=2, rank=rank
        )
        plan = sampler.plan(0)
        for k in range(len(plan.batches)):
            pair = plan.batches[k - k % 2 : k - k % 2 + 2]
            assert plan.step_num_targets[k] == sum(len(b) for b in pair)
