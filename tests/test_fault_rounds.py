"""Each fault kind through FedMD's round loop, without Ray: the run's status and summary.

The in-memory grid answers through `FaultyClientApp` around a fake honest client, as Flower's
engine would: a handler that raises gives an error reply, and a reply whose handler slept past
the round (hang, dropout) arrives only after its wave ended (it is released when the next wave
is pushed, so the node also misses the next round, as a straggler does). The wire checks every
reply (`ReplyGuard`) and the Recorder judges the run, as in a simulation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedkd.records import rows_of
from fedkd.aggregation import mean_probs
from fedkd.client.faults import FaultyClientApp
from fedkd.faults import FaultPlan, plan_faults
from fedkd.reply_guard import ReplyGuard
from fedkd.simulations.faults import fault_summary
from fedkd.simulations.results import Recorder
from fedkd.strategies.fedmd import FedMD
from fedkd.wire import WireGrid
from tests.conftest import reply
from tests.helpers import FakeGrid, bound
from tests.test_reply_guard import honest

NODES = [11, 12, 13, 14]
ROUNDS = 4


class Honest(ClientApp):
    """fedkd's replies in shape and size: one confident class per public row, accuracy 0.8."""

    def __init__(self, settings) -> None:
        super().__init__()
        self.settings = settings

    def __call__(self, message: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if message.metadata.message_type != "train.distill":
            return honest(message, self.settings, pid)
        rows = rows_of(message.content["transfer"], "next")
        c = int(self.settings.data["num_classes"])
        return reply(message, logits=np.eye(c, dtype=np.float32)[rows % c] * 5, partition_id=pid,
                     num_examples=self.settings.data["client_sizes"][pid],
                     **{"train-loss": 0.3, "test-accuracy": 0.8, "test-loss": 0.5})


class FaultGrid(FakeGrid):
    """Nodes answer through `app`; a reply whose handler slept is held until the next push."""

    def __init__(self, app: FaultyClientApp) -> None:
        super().__init__(list(NODES))
        self.app = app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 11},
                                    state=RecordDict(), run_config={}) for n in NODES}
        self.late: dict[str, Message] = {}
        self.slept = False
        app.sleep = self._sleep

    def _sleep(self, seconds: float) -> None:
        self.slept = True

    def deliver(self) -> None:
        for mid, msg in list(self.inbox.items()):
            self.slept = False
            try:
                out = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - Flower turns a raise into an error reply
                out = reply(msg, error=f"{type(err).__name__}: {err}")
            del self.inbox[mid]
            (self.late if self.slept else self.outbox)[mid] = out

    def push_messages(self, messages):
        self.outbox.update(self.late)  # the sleeper's reply arrives, after its round
        self.late.clear()
        return super().push_messages(messages)


def _run(small_run, tmp_path, plan: FaultPlan | None) -> dict:
    settings = small_run.settings
    grid = FaultGrid(FaultyClientApp(Honest(settings), plan or FaultPlan(4, ROUNDS, 0)))
    wire = WireGrid(grid, poll_interval=0.0, check=ReplyGuard(settings, connected=grid.get_node_ids))
    recorder = Recorder(tmp_path, list(small_run.archs), {
        "strategy": "fedmd", "dataset": "digits", "partition": "dirichlet", "num_clients": 4,
        "num_rounds": ROUNDS, "seed": 0, "num_classes": 10, **fault_summary(plan)})
    wire.observers.append(recorder.on_replies)
    strategy = bound(FedMD(aggregator=mean_probs, min_replies=2, min_available_nodes=1,
                           wait_for_nodes_s=0), settings)
    strategy.server_metric_sinks.append(recorder.on_server_metrics)
    config = ConfigRecord(settings.to_config())
    strategy.start(grid=wire, initial_arrays=ArrayRecord(), num_rounds=ROUNDS, timeout=0.2,
                   train_config=config, evaluate_config=config)
    return recorder.finish()


def _plan(spec: dict) -> FaultPlan:
    return plan_faults(spec, 4, ROUNDS, round_timeout=0.2, seed=0)


def test_no_fault_is_ok(flower_ids, small_run, tmp_path):
    summary = _run(small_run, tmp_path, None)
    assert summary["status"] == "ok" and summary["faults"] is None


@pytest.mark.parametrize(("kind", "failed"), [
    ("crash", [2]),          # an error reply in its round
    ("corrupt", [2]),        # NaN logits: dropped by the guard
    ("hang", [2, 3]),        # late: timed out in round 2, still busy in round 3
    ("dropout", [2, 3]),     # gone in round 2 (no training), busy in round 3
])
def test_each_fault_kind_degrades_the_run_and_names_the_client(flower_ids, small_run, tmp_path,
                                                               kind, failed):
    plan = dataclasses.replace(_plan({kind: {"clients": [1]}}), rounds={kind: {1: (2,)}})
    summary = _run(small_run, tmp_path, plan)
    assert summary["status"] == "degraded", summary["status_reasons"]
    assert summary["failed_rounds_by_client"] == {"1": failed}
    assert summary["faults"][kind] == [1] and summary["faults"][f"{kind}_rounds"] == {"1": [2]}
    assert summary["honest_clients"] == [0, 2, 3]
    assert summary["final_mean_accuracy_honest"] == pytest.approx(0.8)
    assert summary["replies_dropped"] == (1 if kind == "corrupt" else 0)
    if kind == "crash":
        assert any("injected crash (partition 1, round 2)" in r for r in summary["status_reasons"])


def test_a_size_beyond_the_partition_is_dropped_every_round(flower_ids, small_run, tmp_path):
    summary = _run(small_run, tmp_path, _plan({"byzantine": {
        "clients": [1], "attack": "confident_wrong", "claim": 10**9}}))
    assert summary["status"] == "degraded"
    assert summary["replies_dropped"] == ROUNDS
    assert summary["failed_rounds_by_client"] == {"1": list(range(1, ROUNDS + 1))}
    assert summary["faults"]["claim"] == 10**9


def test_a_byzantine_teacher_is_ok_for_the_status_but_stands_out(flower_ids, small_run, tmp_path):
    summary = _run(small_run, tmp_path, _plan({"byzantine": {"clients": [1], "attack": "sign_flip"}}))
    assert summary["status"] == "ok"  # its replies are well formed: only the anomaly shows it
    assert summary["faults"] == {"seed": 0, "byzantine": [1], "attack": "sign_flip",
                                 "claim": None}
    scores = summary["anomaly_score_by_client"]
    assert scores["1"] > 0.5 and max(scores[c] for c in "023") < 1e-6
