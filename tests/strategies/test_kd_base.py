"""KDStrategy hooks: what configure_train sends and how aggregate_train treats replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedkd.aggregation import mean_logits, mean_probs, softmax, weighted
from fedkd.errors import ConfigError
from fedkd.strategies.fedmd import FedMD
from fedkd.strategies.local import Local
from tests.conftest import reply
from tests.test_wire import FakeGrid
from tests.helpers import bound


def _configure(strategy, small_run, server_round=1, arrays=None, nodes=(11, 12, 13, 14)):
    grid = FakeGrid(list(nodes))
    return bound(strategy, small_run.settings).configure_train(server_round, arrays or ArrayRecord(), small_run.settings.to_config(), grid)


def test_fedmd_is_a_flower_strategy():
    assert isinstance(FedMD(), Strategy) and isinstance(Local(), Strategy)


def test_round_one_sends_the_whole_public_set_as_indices_and_no_targets(flower_ids, small_run):
    messages = _configure(FedMD(min_available_nodes=1, wait_for_nodes_s=0), small_run)
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13, 14]
    msg = messages[0]
    assert msg.metadata.message_type == "train.distill" and msg.metadata.group_id == "1"
    transfer = msg.content["transfer"]
    assert list(transfer.keys()) == ["next.indices"]
    np.testing.assert_array_equal(transfer["next.indices"].numpy(),
                                  np.arange(small_run.data.num_public))
    assert msg.content["config"]["server-round"] == 1
    assert "fedkd.settings" in msg.content["config"]


def test_transfer_size_samples_a_seeded_subset(flower_ids, small_run):
    rows = [_configure(FedMD(transfer_size=50, seed=s, min_available_nodes=1), small_run)[0]
            .content["transfer"]["next.indices"].numpy() for s in (3, 3, 4)]
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
    np.testing.assert_array_equal(arrays["targets.indices"].numpy(), np.arange(n))


def test_next_round_carries_the_soft_targets_back(flower_ids, small_run):
    n, c = small_run.data.num_public, small_run.data.num_classes
    logits = {p: np.full((n, c), float(p), dtype=np.float32) for p in range(2)}
    strategy = FedMD(aggregator=mean_logits, min_available_nodes=1)
    arrays, _ = _round(strategy, small_run, logits, order=[0, 1])
    msg = _configure(strategy, small_run, server_round=2, arrays=arrays)[0]
    transfer = msg.content["transfer"]
    assert sorted(transfer.keys()) == ["next.indices", "targets.indices", "targets.probs"]
    np.testing.assert_allclose(transfer["targets.probs"].numpy(), np.full((n, c), 1.0 / c), rtol=1e-6)


@pytest.mark.parametrize("bad", ["nan", "shape", "missing", "negative size", "no size"])
def test_malformed_replies_are_dropped(flower_ids, small_run, bad):
    n, c = small_run.data.num_public, small_run.data.num_classes
    good = np.zeros((n, c), dtype=np.float32)
    broken = {"nan": np.full((n, c), np.nan, dtype=np.float32),
              "shape": np.zeros((n - 1, c), dtype=np.float32), "missing": None}.get(bad, good)
    sizes = {"negative size": -5.0, "no size": None}

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
    assert seen == [(1, {"epsilon": 1.5})]
