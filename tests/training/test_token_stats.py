"""TokenStats: exact per-token means overall and per task, across several adds."""

import pytest
import torch

from litovis.training.token_stats import TokenStats


def test_means_overall_and_per_task() -> None:
    stats = TokenStats(n_tasks=2)
    ce = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([True, True, False, True])
    task = torch.tensor([0, 1, 1, 1])
    stats.add(ce * 0.5, ce, ce * 0.1, torch.tensor([True, False, True, True]), mask, task)
    stats.add(torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([0.2]), torch.tensor([False]), torch.tensor([True]), torch.tensor([0]))
    means = stats.means("train", ["a", "b"])
    # targets: task a -> ce 1, 4 ; task b -> ce 2, 4 (the masked 3 is excluded)
    assert means["train/ce"] == pytest.approx((1 + 2 + 4 + 4) / 4)
    assert means["train/ce_a"] == pytest.approx(2.5)
    assert means["train/ce_b"] == pytest.approx(3.0)
    assert means["train/loss"] == pytest.approx((0.5 + 1 + 2 + 2) / 4)
    assert means["train/token_acc"] == pytest.approx(2 / 4)
    assert means["train/token_acc_a"] == pytest.approx(1 / 2)
    assert stats.targets == 4


def test_tasks_without_targets_are_not_reported_and_reset_clears() -> None:
    stats = TokenStats(n_tasks=2)
    one = torch.ones(1)
    stats.add(one, one, one, torch.tensor([True]), torch.tensor([True]), torch.tensor([1]))
    assert "train/ce_a" not in stats.means("train", ["a", "b"])
    stats.reduce(lambda t: t * 2)  # stands in for an all-reduce over two identical ranks
    assert stats.targets == 2
    stats.reset()
    assert stats.means("train", ["a", "b"]) == {}
