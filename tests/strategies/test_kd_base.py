"""KDStrategy hooks: what configure_train sends and how aggregate_train treats replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from fedkd.records import rows_of
from fedkd.aggregation import mean_logits, mean_probs, softmax, weighted
from fedkd.errors import ConfigError
from fedkd.sampling import sample_partitions
from fedkd.strategies.fedmd import FedMD
from fedkd.strategies.local import Local
from fedkd.wire import WireGrid
from tests.conftest import reply
from tests.helpers import FakeGrid, bound


def _configure(strategy, small_run, server_round=1, arrays=None, nodes=(11, 12, 13, 14)):
    grid = FakeGrid(list(nodes))
    return bound(strategy, small_run.settings).configure_train(server_round, arrays or ArrayRecord(), small_run.settings.to_config(), grid)


def _start(strategy, small_run, num_rounds=3, nodes=(11, 12, 13, 14)):
    """Flower's own round loop (`Strategy.start`, as the ServerApp calls it) on a WireGrid over
    an in-memory grid whose node 11 + p answers as partition p with logits and test accuracy."""
    c = small_run.data.num_classes

    def answer(msg):
        pid, rnd = msg.metadata.dst_node_id - nodes[0], int(msg.metadata.group_id)
        transfer = msg.content["transfer"]
        rows = len(rows_of(transfer, "next")) if rows_of(transfer, "next") is not None else 0
        logits = np.tile(np.arange(c, dtype=np.float32) * (pid + rnd), (rows, 1)) if rows else None
        return reply(msg, logits=logits, partition_id=pid, **{"test-accuracy": 0.1 * rnd + 0.01 * pid})

    fake = FakeGrid(list(nodes), answer=answer)
    config = ConfigRecord(small_run.settings.to_config())
    result = bound(strategy, small_run.settings).start(
        grid=WireGrid(fake, poll_interval=0.0), initial_arrays=ArrayRecord(), num_rounds=num_rounds,
        timeout=60, train_config=config, evaluate_config=config)
    return result, fake


def test_fedmd_runs_flower_s_round_loop(flower_ids, small_run):
    aggregates = []

    def spy(stacked, meta, temperature):
        aggregates.append(mean_logits(stacked, meta, temperature=temperature))
        return aggregates[-1]

    assert isinstance(FedMD(), Strategy)
    result, fake = _start(FedMD(aggregator=spy, min_available_nodes=1, wait_for_nodes_s=0), small_run)

    sent = [(m.metadata.group_id, m.metadata.message_type, m.metadata.dst_node_id) for m in fake.pushed]
    assert sent == [(str(r), "train.distill", n) for r in (1, 2, 3) for n in (11, 12, 13, 14)]
    assert len(aggregates) == 3  # aggregate_train in every round
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    for rnd, metrics in result.train_metrics_clientapp.items():
        assert metrics["test-accuracy"] == pytest.approx(0.1 * rnd + 0.015)  # mean over 4 partitions
    # The loop hands each round's aggregate to the next configure_train: round r + 1 carries it.
    assert "targets.probs" not in fake.pushed[0].content["transfer"]
    for rnd in (2, 3):
        carried = fake.pushed[4 * (rnd - 1)].content["transfer"]["targets.probs"].numpy()
        np.testing.assert_allclose(carried, aggregates[rnd - 2], rtol=1e-6)
    np.testing.assert_allclose(result.arrays["targets.probs"].numpy(), aggregates[-1], rtol=1e-6)
    assert not np.allclose(aggregates[0], aggregates[1])  # the rounds did differ


def test_local_runs_flower_s_round_loop(flower_ids, small_run):
    result, fake = _start(Local(min_available_nodes=1, wait_for_nodes_s=0), small_run, num_rounds=2)
    assert [(m.metadata.group_id, len(m.content["transfer"])) for m in fake.pushed] == [
        (str(r), 0) for r in (1, 2) for _ in range(4)]
    assert {r: m["test-accuracy"] for r, m in result.train_metrics_clientapp.items()} == pytest.approx(
        {1: 0.115, 2: 0.215})


def test_round_one_sends_the_whole_public_set_as_indices_and_no_targets(flower_ids, small_run):
    messages = _configure(FedMD(min_available_nodes=1, wait_for_nodes_s=0), small_run)
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13, 14]
    msg = messages[0]
    assert msg.metadata.message_type == "train.distill" and msg.metadata.group_id == "1"
    transfer = msg.content["transfer"]
    assert list(transfer.keys()) == ["next.mask"]  # increasing rows travel as packed bits
    np.testing.assert_array_equal(rows_of(transfer, "next"),
                                  np.arange(small_run.data.num_public))
    assert msg.content["config"]["server-round"] == 1
    assert "fedkd.settings" in msg.content["config"]


def test_transfer_size_samples_a_seeded_subset(flower_ids, small_run):
    rows = [rows_of(_configure(FedMD(transfer_size=50, seed=s, min_available_nodes=1), small_run)[0]
            .content["transfer"], "next") for s in (3, 3, 4)]
    assert len(rows[0]) == 50 and len(set(rows[0])) == 50
    np.testing.assert_array_equal(rows[0], rows[1])
    assert not np.array_equal(rows[0], rows[2])


def test_local_sends_no_transfer_and_aggregates_nothing(flower_ids, small_run):
    strategy = Local(min_available_nodes=1)
    msg = _configure(strategy, small_run)[0]
    assert len(msg.content["transfer"]) == 0
    arrays, metrics = strategy.aggregate_train(1, [reply(msg, partition_id=0, **{"test-accuracy": 0.5})])
    assert arrays is None and metrics["test-accuracy"] == 0.5


def _round(strategy, small_run, logits_by_pid, order, extra=()):
    msgs = _configure(strategy, small_run, nodes=tuple(100 + p for p in range(len(order))))
    replies = [reply(msgs[i], logits=logits_by_pid[p], partition_id=p) for i, p in enumerate(order)]
    return strategy.aggregate_train(1, replies + [r(msgs[0]) for r in extra])


def test_aggregate_sorts_by_partition_id_then_applies_the_aggregator(flower_ids, small_run):
    n, c = small_run.data.num_public, small_run.data.num_classes
    rng = np.random.default_rng(0)
    logits = {p: rng.normal(size=(n, c)).astype(np.float32) for p in range(3)}
    seen = []

    def spy(stacked, meta, temperature):
        seen.append(meta.partition_ids.tolist())
        return mean_probs(stacked, meta, temperature=temperature)

    strategy = FedMD(aggregator=spy, temperature=2.0, min_available_nodes=1)
    arrays, _ = _round(strategy, small_run, logits, order=[2, 0, 1])
    assert seen == [[0, 1, 2]]
    expected = np.mean([softmax(logits[p], 2.0) for p in range(3)], axis=0)
    np.testing.assert_allclose(arrays["targets.probs"].numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(rows_of(arrays, "targets"), np.arange(n))


def test_next_round_carries_the_soft_targets_back(flower_ids, small_run):
    n, c = small_run.data.num_public, small_run.data.num_classes
    logits = {p: np.full((n, c), float(p), dtype=np.float32) for p in range(2)}
    strategy = FedMD(aggregator=mean_logits, min_available_nodes=1)
    arrays, _ = _round(strategy, small_run, logits, order=[0, 1])
    msg = _configure(strategy, small_run, server_round=2, arrays=arrays)[0]
    transfer = msg.content["transfer"]
    assert sorted(transfer.keys()) == ["next.mask", "targets.mask", "targets.probs"]
    np.testing.assert_allclose(transfer["targets.probs"].numpy(), np.full((n, c), 1.0 / c), rtol=1e-6)


@pytest.mark.parametrize("bad", ["nan", "shape", "missing", "huge logits", "negative size",
                                 "no size", "huge size"])
def test_malformed_replies_are_dropped(flower_ids, small_run, bad):
    n, c = small_run.data.num_public, small_run.data.num_classes
    good = np.zeros((n, c), dtype=np.float32)
    broken = {"nan": np.full((n, c), np.nan, dtype=np.float32),
              "shape": np.zeros((n - 1, c), dtype=np.float32), "missing": None,
              "huge logits": np.full((n, c), 1e6, dtype=np.float32)}.get(bad, good)
    sizes = {"negative size": -5.0, "no size": None, "huge size": 10**12}  # > partition 1's rows

    def attempt(min_replies):
        strategy = FedMD(aggregator=weighted, min_available_nodes=1, min_replies=min_replies)
        msgs = _configure(strategy, small_run, nodes=(100, 101, 102))
        replies = [reply(msgs[0], logits=good, partition_id=0),
                   reply(msgs[1], logits=broken, partition_id=1),
                   reply(msgs[2], logits=good, partition_id=2)]
        if bad in sizes:
            metrics = replies[1].content["metrics"]
            if sizes[bad] is None:
                del metrics["num-examples"]
            else:
                metrics["num-examples"] = sizes[bad]
        return strategy.aggregate_train(1, replies)[0]

    assert attempt(2) is not None  # two valid replies remain
    assert attempt(3) is None  # below the minimum: previous targets stay in place


def test_error_replies_do_not_count(flower_ids, small_run):
    n, c = small_run.data.num_public, small_run.data.num_classes
    strategy = FedMD(aggregator=mean_logits, min_available_nodes=1, min_replies=2)
    arrays, _ = _round(strategy, small_run, {0: np.zeros((n, c), np.float32)}, order=[0],
                       extra=[lambda m: reply(m, error="boom")])
    assert arrays is None


def test_busy_nodes_are_not_sampled(flower_ids, small_run):
    grid = FakeGrid([1, 2, 3])
    grid.busy_node_ids = lambda: {2}
    msgs = bound(FedMD(min_available_nodes=1), small_run.settings).configure_train(1, ArrayRecord(), small_run.settings.to_config(), grid)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 3]


@pytest.mark.parametrize("kwargs", [{"fraction_train": 0}, {"fraction_train": 1.5},
                                    {"min_replies": 0}, {"transfer_size": 0}])
def test_bad_strategy_values_are_named(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ConfigError, match=key):
        FedMD(**kwargs)


def test_aggregator_reports_reach_the_server_metric_sinks(flower_ids, small_run):
    class Reporting:
        calls = 0

        def __call__(self, logits, meta, temperature):
            self.calls += 1
            return mean_probs(logits, meta, temperature=temperature)

        def report(self):
            return {"epsilon": 1.5 * self.calls}

    n, c = small_run.data.num_public, small_run.data.num_classes
    strategy = FedMD(aggregator=Reporting(), min_available_nodes=1)
    seen = []
    strategy.server_metric_sinks.append(lambda rnd, values: seen.append((rnd, values)))
    _round(strategy, small_run, {0: np.zeros((n, c), np.float32), 1: np.ones((n, c), np.float32)},
           order=[1, 0])
    assert seen == [(1, {"anomaly-score/0": 0.0, "anomaly-score/1": 0.0}),  # equal: both uniform
                    (1, {"valid-replies": 2.0, "rejected-replies": 0.0, "below-min-replies": 0.0}),
                    (1, {"epsilon": 1.5})]


@pytest.mark.parametrize("fraction, size", [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_each_round_trains_the_fraction_train_sample_of_partitions(flower_ids, small_run, fraction,
                                                                    size):
    """`max(int(4 * fraction_train), min_train_nodes)` partitions per round, the seeded sample of
    partition ids mapped to their nodes (ignoring fraction_train would train all 4 every round)."""
    pid_of = {230 + 7 * p: p for p in range(4)}  # node ids unrelated to the partition ids
    grid = WireGrid(FakeGrid(list(pid_of), answer=lambda m: reply(
        m, partition_id=pid_of[m.metadata.dst_node_id])), poll_interval=0.0)
    strategy = bound(FedMD(fraction_train=fraction, min_train_nodes=1, min_available_nodes=1,
                           wait_for_nodes_s=0, seed=9), small_run.settings)
    for rnd in (1, 2, 3):
        msgs = strategy.configure_train(rnd, ArrayRecord(), small_run.settings.to_config(), grid)
        assert {m.metadata.message_type for m in msgs} == {"train.distill"} and len(msgs) == size
        assert sorted(pid_of[m.metadata.dst_node_id] for m in msgs) == sample_partitions(
            4, fraction, 1, 9, rnd)
