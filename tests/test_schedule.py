"""Per-client learning-rate decay: the closed form equals torch's ExponentialLR, and a client's
k-th round runs at lr * decay**k whether its student comes from Context.state or is new."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import Context, RecordDict

from fedkd.client.state import Student
from fedkd.errors import ConfigError
from fedkd.optim import build_optimizer, schedule_lr, scheduled_lr
from fedkd.settings import TrainSettings


def test_scheduled_lr_equals_torch_exponential_lr():
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    for k in range(50):
        assert scheduled_lr(0.01, 0.99, k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()


def test_scheduled_rate_starts_from_the_spec_lr_or_the_optimizers_default():
    params = [torch.zeros(1, requires_grad=True)]
    sgd = build_optimizer({"_target_": "torch.optim.SGD", "lr": 0.05}, params)
    schedule_lr(sgd, 0.5, 0)
    assert sgd.param_groups[0]["lr"] == 0.05
    adam = build_optimizer({"_target_": "torch.optim.Adam"}, params)
    schedule_lr(adam, 0.5, 2)
    assert adam.param_groups[0]["lr"] == pytest.approx(0.001 * 0.25)


@pytest.mark.parametrize("decay", [0, -0.5, 1.5, True, float("nan")])
def test_lr_decay_is_checked(decay):
    with pytest.raises(ConfigError, match=r"distill.lr_decay=.*: must be a number in \(0, 1\]"):
        TrainSettings(lr_decay=decay)


def test_a_clients_kth_round_runs_at_the_decayed_rate(small_run):
    train = dataclasses.replace(small_run.settings.train, lr_decay=0.9,
                                optimizer={"_target_": "torch.optim.SGD", "lr": 0.1})
    settings = dataclasses.replace(small_run.settings, train=train)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    for k in range(4):
        student = Student.restore(context, settings, 0)
        assert student.rounds_done == k
        assert student.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** k)
        student.reset_optimizer(settings)  # parameter exchange: a fresh optimizer, same rate
        assert student.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** k)
        student.rounds_done += 1
        student.save(context)
