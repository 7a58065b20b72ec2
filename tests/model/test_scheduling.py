"""Batch planning for generation: every prompt once, longest first, within the row and token budgets."""

from __future__ import annotations

import pytest

from litovis.model.scheduling import BatchBudget, plan_batches


@pytest.mark.parametrize("budget", [BatchBudget(3, 1000), BatchBudget(64, 40), BatchBudget(1, 1), BatchBudget(4, 25)])
def test_plans_cover_every_prompt_once_within_budgets(budget: BatchBudget) -> None:
    lengths = [5, 17, 3, 17, 9, 30, 1, 12, 8, 8, 50]
    batches = plan_batches(lengths, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    order = [i for batch in batches for i in batch]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True), "longest first"
    assert order == sorted(order, key=lambda i: (-lengths[i], i)), "ties keep input order"
    for batch in batches:
        assert len(batch) <= budget.max_batch_size
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget.max_batch_tokens or len(batch) == 1, "only a lone prompt may exceed the budget"


def test_plans_fill_batches_greedily() -> None:
    assert plan_batches([10, 10, 10, 10, 10], BatchBudget(2, 1000)) == [[0, 1], [2, 3], [4]]
    assert plan_batches([4, 9, 4, 4], BatchBudget(8, 18)) == [[1, 0], [2, 3]]
    assert plan_batches([], BatchBudget()) == []


def test_invalid_budget_raises() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        plan_batches([1], BatchBudget(0, 10))
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([1], BatchBudget(1, 0))
