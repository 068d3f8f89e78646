"""A student kept in Context.state comes back exactly: weights, optimizer state, counters."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import Context, RecordDict

from fedkd.client.state import Student, load_optimizer_state, optimizer_state

SPECS = [
    {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
    {"_target_": "torch.optim.SGD", "lr": 0.1},
    {"_target_": "torch.optim.Adam", "lr": 0.01},
]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(8, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['_target_']}-{len(s)}")
def test_optimizer_state_round_trips_and_training_continues_identically(spec):
    from fedkd.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = build_optimizer(spec, model.parameters())
    _train(model, opt, 1)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(spec, twin.parameters())
    load_optimizer_state(twin_opt, *optimizer_state(opt))
    _train(model, opt, 2)
    _train(twin, twin_opt, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_restored_student_equals_the_saved_one(small_run):
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    student = Student.restore(context, small_run.settings, 0)
    x = torch.randn(16, *small_run.data.input_shape)
    loss = student.model(x).logsumexp(1).mean()
    student.optimizer.zero_grad()
    loss.backward()
    student.optimizer.step()
    student.rounds_done = 1
    student.save(context)
    back = Student.restore(context, small_run.settings, 0)
    assert back.rounds_done == 1
    for (name, a), b in zip(student.model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(a, b), name
        assert b.device.type == "cpu"
    assert str(back.optimizer.state_dict()["state"]) == str(student.optimizer.state_dict()["state"])
