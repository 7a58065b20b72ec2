"""Per-rank RNG state in checkpoints (the 2-process resume itself: test_distributed)."""

from __future__ import annotations

import torch

from litovis.training.rng_state import gather_rng_states, rank_rng_state, restore_rng_state


def test_a_restored_state_draws_the_same_numbers_again() -> None:
    (state,) = gather_rng_states(torch.device("cpu"))  # one process: one state
    first = torch.rand(4)
    torch.manual_seed(123)
    restore_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(4), first)


def test_each_rank_takes_its_own_state_and_old_checkpoints_still_load() -> None:
    states = [{"torch": torch.tensor([r])} for r in range(3)]
    assert [rank_rng_state(states, r)["torch"].item() for r in range(3)] == [0, 1, 2]
    assert rank_rng_state(states, 3) is None  # written by fewer ranks: keep the seed's state
    single = {"torch": torch.tensor([7])}  # a one-process checkpoint from before per-rank states
    assert rank_rng_state(single, 0) is single and rank_rng_state(single, 1) is None
    assert rank_rng_state(None, 0) is None
