"""The LR schedule: warm-up and cosine, the DFT re-warm, and where its length comes from."""

from __future__ import annotations

import math

import pytest

from litovis.training.lr_schedule import lr_factor, schedule_length


def test_warmup_then_cosine_to_the_floor() -> None:
    assert lr_factor(0, total=100, warmup=9) == pytest.approx(0.1)
    assert lr_factor(8, total=100, warmup=9) == pytest.approx(0.9)
    assert lr_factor(9, total=100, warmup=9) == pytest.approx(1.0)
    midway = 9 + (100 - 9) / 2
    assert lr_factor(int(midway), total=100, warmup=9) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(midway) - 9) / 91)))
    assert lr_factor(100, total=100, warmup=9, floor=0.1) == pytest.approx(0.1)
    assert lr_factor(500, total=100, warmup=9) == pytest.approx(0.0)


def test_restart_rewarms_to_the_peak_and_decays_to_the_end() -> None:
    before = lr_factor(2599, total=2900, warmup=273, restart=(2600, 30))
    assert before < 0.05  # late in the SFT cosine
    assert lr_factor(2600, total=2900, warmup=273, restart=(2600, 30)) == pytest.approx(1 / 31)
    assert lr_factor(2630, total=2900, warmup=273, restart=(2600, 30)) == pytest.approx(1.0)
    assert lr_factor(2900, total=2900, warmup=273, restart=(2600, 30)) == pytest.approx(0.0)


def test_schedule_length_prefers_total_steps_then_max_steps_then_epochs() -> None:
    def ten_per_epoch() -> int:
        return 10

    assert schedule_length(7, 50, 3, ten_per_epoch) == 7
    assert schedule_length(None, 50, -1, None) == 50
    assert schedule_length(None, -1, 3, ten_per_epoch) == 30


def test_a_run_without_an_end_has_no_schedule_length() -> None:
    def ten_per_epoch() -> int:
        return 10

    for max_epochs in (-1, 0, None):
        with pytest.raises(ValueError, match="set optimizer.total_steps or trainer.max_steps"):
            schedule_length(None, -1, max_epochs, ten_per_epoch)
    with pytest.raises(ValueError, match="set optimizer.total_steps or trainer.max_steps"):
        schedule_length(None, -1, 3, None)
