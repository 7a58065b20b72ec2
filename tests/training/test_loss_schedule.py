"""LossSchedule: the loss kind and LR factor as functions of the step, optimizer reset, state."""

from types import SimpleNamespace

import pytest
import torch

from litovis.training.loss_schedule import LossSchedule


def test_kind_follows_the_global_step() -> None:
    schedule = LossSchedule(dft_from_step=10)
    assert [schedule.kind_at(s) for s in (0, 9, 10, 500)] == ["ce", "ce", "dft", "dft"]
    assert LossSchedule().kind_at(10**6) == "ce"
    assert LossSchedule(dft_from_step=0).kind_at(0) == "dft"


def test_only_rewarm_restarts_the_lr_schedule() -> None:
    assert LossSchedule(dft_from_step=100, on_switch="rewarm", rewarm_steps=4).schedule_restart() == (100, 4)
    assert LossSchedule(dft_from_step=100).schedule_restart() is None


@pytest.mark.parametrize(
    "kwargs",
    [{"dft_from_step": -1}, {"on_switch": "explode"}, {"dft_from_step": 5, "on_switch": "rewarm"}, {"on_switch": "reset_optimizer"}],
)
def test_invalid_settings_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LossSchedule(**kwargs)


def test_optimizer_state_is_reset_once_at_the_switch() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    trainer = SimpleNamespace(global_step=5, optimizers=[optimizer])
    module = SimpleNamespace(loss_kind="ce")
    schedule = LossSchedule(dft_from_step=6, on_switch="reset_optimizer")
    schedule.on_train_batch_start(trainer, module, None, 0)
    assert module.loss_kind == "ce" and optimizer.state
    trainer.global_step = 6
    schedule.on_train_batch_start(trainer, module, None, 0)
    assert module.loss_kind == "dft" and not optimizer.state
    optimizer.step()  # second micro-batch of the same step must not reset again
    schedule.on_train_batch_start(trainer, module, None, 1)
    assert optimizer.state


def test_state_is_never_empty_and_a_changed_schedule_warns() -> None:
    schedule = LossSchedule(dft_from_step=3)
    state = schedule.state_dict()
    assert state
    LossSchedule(dft_from_step=3).load_state_dict(state)
    with pytest.warns(UserWarning, match="differs"):
        LossSchedule(dft_from_step=7).load_state_dict(state)
