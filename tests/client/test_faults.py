"""Faults injected on the client: `FaultyClientApp` around a fake ClientApp and around fedkd's."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedkd.client import app as client_app
from fedkd.client.faults import FaultyClientApp, InjectedFault, message_round
from fedkd.faults import Attack, FaultPlan, attack_logits, plan_faults
from fedkd.records import transfer_record
from tests.client.test_app import _context, _msg
from tests.conftest import reply, request

HONEST = np.array([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]], np.float32)


class Honest(ClientApp):
    """Answers every message with `HONEST` logits and 7 examples; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, message: Message, context: Context) -> Message:
        self.calls += 1
        pid = int(context.node_config["partition-id"])
        return reply(message, logits=HONEST.copy(), partition_id=pid, num_examples=7)


def _plan(kind: str, clients=(1,), rounds=(2,), **attack) -> FaultPlan:
    return FaultPlan(num_clients=3, num_rounds=3, seed=0, clients={kind: tuple(clients)},
                     rounds={kind: {c: tuple(rounds) for c in clients}}, attack=Attack(**attack),
                     corruption="nan", sleep_s=9.0)


def _send(app: ClientApp, pid: int, server_round: int, kind: str = "train.distill") -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return app(request(content, dst=100 + pid, server_round=server_round, message_type=kind),
               _context(pid))


class Clock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def _logits(out: Message) -> np.ndarray:
    return out.content["logits"]["logits"].numpy()


def test_crash_raises_in_its_rounds_only_without_running_the_handler(flower_ids):
    inner = Honest()
    app = FaultyClientApp(inner, _plan("crash"))
    with pytest.raises(InjectedFault, match=r"injected crash \(partition 1, round 2\)"):
        _send(app, 1, 2)
    assert inner.calls == 0
    np.testing.assert_array_equal(_logits(_send(app, 1, 1)), HONEST)  # another round
    np.testing.assert_array_equal(_logits(_send(app, 0, 2)), HONEST)  # another client
    assert inner.calls == 2


def test_dropout_sleeps_without_training_then_fails(flower_ids):
    inner, clock = Honest(), Clock()
    app = FaultyClientApp(inner, _plan("dropout"), sleep=clock)
    with pytest.raises(InjectedFault, match="injected dropout"):
        _send(app, 1, 2)
    assert clock.slept == [9.0] and inner.calls == 0


def test_hang_answers_honestly_but_late(flower_ids):
    inner, clock = Honest(), Clock()
    app = FaultyClientApp(inner, _plan("hang"), sleep=clock)
    np.testing.assert_array_equal(_logits(_send(app, 1, 2)), HONEST)
    assert clock.slept == [9.0] and inner.calls == 1


@pytest.mark.parametrize("attack", ["sign_flip", "confident_wrong", "label_flip", "random"])
def test_byzantine_replaces_the_logits_with_the_attack(flower_ids, attack):
    app = FaultyClientApp(Honest(), _plan("byzantine", name=attack))
    out = _send(app, 1, 2)
    np.testing.assert_array_equal(_logits(out), attack_logits(HONEST, Attack(attack), 0, 1, 2))
    assert out.content["metrics"]["num-examples"] == 7
    np.testing.assert_array_equal(_logits(_send(app, 2, 2)), HONEST)


def test_byzantine_claim_replaces_the_example_count(flower_ids):
    app = FaultyClientApp(Honest(), _plan("byzantine", name="none", claim=10**9))
    out = _send(app, 1, 2)
    assert out.content["metrics"]["num-examples"] == 10**9
    np.testing.assert_array_equal(_logits(out), HONEST)


def test_corrupt_sends_nan_logits(flower_ids):
    out = _send(FaultyClientApp(Honest(), _plan("corrupt")), 1, 2)
    assert np.isnan(_logits(out)).all()


def test_only_round_messages_are_touched(flower_ids):
    inner = Honest()
    app = FaultyClientApp(inner, _plan("crash", rounds=(0, 1, 2, 3)))
    _send(app, 1, 2, kind="query.whoami")  # the server asks who is who: never faulty
    _send(app, 1, 2, kind="evaluate")
    assert inner.calls == 2
    with pytest.raises(InjectedFault):
        _send(app, 1, 2, kind="train")
    # a generator's query wave sees the attack, never a crash
    byzantine = FaultyClientApp(Honest(), _plan("byzantine", name="sign_flip"))
    np.testing.assert_array_equal(_logits(_send(byzantine, 1, 2, kind="query")), -HONEST)


def test_the_round_comes_from_the_config_else_the_group_id(flower_ids):
    with_config = request(RecordDict({"config": ConfigRecord({"server-round": 5})}), dst=1,
                          server_round=2)
    assert message_round(with_config) == 5
    assert message_round(request(RecordDict(), dst=1, server_round=4)) == 4


def test_a_planned_run_faults_the_real_client_app_deterministically(flower_ids, small_run):
    """fedkd's own ClientApp behind the plan of a config: the attacker's logits are the attack
    on what the honest handler computed, round by round, the same on a second run."""
    settings, info = small_run.settings, small_run.data
    plan = plan_faults({"byzantine": {"clients": [1], "attack": "label_flip"},
                        "crash": {"clients": [2], "probability": 1.0}}, 4, 3, 5.0, seed=0)
    rows = np.arange(info.num_public)

    def first_round(app: ClientApp, pid: int) -> Message:
        return app(_msg(settings, 1, transfer_record(next_rows=rows), pid), _context(pid))

    honest = first_round(client_app.app, 1)
    faulty = FaultyClientApp(client_app.app, plan)
    attacked = first_round(faulty, 1)
    np.testing.assert_array_equal(_logits(attacked), np.roll(_logits(honest), plan_shift(info), -1))
    np.testing.assert_array_equal(_logits(attacked), _logits(first_round(faulty, 1)))
    with pytest.raises(InjectedFault):
        first_round(faulty, 2)
    np.testing.assert_array_equal(_logits(first_round(faulty, 0)),
                                  _logits(first_round(client_app.app, 0)))


def plan_shift(info) -> int:
    from fedkd.faults import class_shift

    return class_shift(0, info.num_classes)
