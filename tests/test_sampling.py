"""Sampling by partition id: the pure sample, the whoami protocol, and every strategy using them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedkd.client import app as client_app
from fedkd.sampling import sample_partitions, sample_size
from fedkd.strategies.fd import FD
from fedkd.strategies.feddf import FedDF
from fedkd.strategies.fedavg import FedAvg
from fedkd.strategies.fedmd import FedMD
from fedkd.strategies.partitions import PartitionMap
from fedkd.wire import WireGrid
from tests.conftest import reply, request
from tests.helpers import FakeGrid, bound

WHOAMI = "query.whoami"


# --- the pure function ------------------------------------------------------------------------
def test_golden_samples():
    """Pinned: a change here changes which clients train in every fraction_train < 1 run."""
    assert sample_partitions(10, 0.5, 2, 0, 1) == [1, 4, 6, 8, 9]
    assert sample_partitions(10, 0.5, 2, 0, 2) == [1, 2, 3, 6, 9]
    assert sample_partitions(10, 0.5, 2, 1, 1) == [3, 4, 6, 8, 9]
    assert [sample_partitions(4, 0.5, 2, 0, r) for r in (1, 2, 3)] == [[2, 3], [1, 3], [0, 3]]
    assert sample_partitions(20, 0.5, 2, 0, 200) == [0, 5, 6, 8, 11, 12, 14, 16, 18, 19]
    assert sample_partitions(10, 0.5, 2, 0, 1, available=[0, 1, 2, 3, 5, 7, 9]) == [0, 2, 3, 5, 9]


def test_the_same_in_another_process_with_another_hash_seed():
    code = "from fedkd.sampling import sample_partitions as s; print(s(10, 0.5, 2, 7, 3))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert outs == {f"{sample_partitions(10, 0.5, 2, 7, 3)}\n"}


@pytest.mark.parametrize("n, fraction, minimum, expected", [
    (10, 0.5, 2, 5), (10, 0.3, 1, 3), (10, 0.1, 3, 3), (4, 0.5, 2, 2), (3, 0.1, 5, 3), (7, 1.0, 2, 7)])
def test_size_follows_fraction_and_minimum(n, fraction, minimum, expected):
    assert sample_size(n, fraction, minimum) == expected
    picked = sample_partitions(n, fraction, minimum, seed=3, server_round=4)
    assert len(picked) == expected and picked == sorted(set(picked))
    assert all(0 <= p < n for p in picked)


def test_rounds_and_seeds_differ_and_available_restricts():
    assert len({tuple(sample_partitions(10, 0.5, 2, 0, r)) for r in range(1, 11)}) > 5
    assert sample_partitions(10, 0.5, 2, 0, 1) != sample_partitions(10, 0.5, 2, 1, 1)
    assert sample_partitions(10, 0.5, 2, 0, 1, available=range(10)) == sample_partitions(10, 0.5, 2, 0, 1)
    assert sample_partitions(10, 0.5, 2, 0, 1, available=[8, 2, 5]) == [2, 5, 8]  # fewer than 5 free
    picked = sample_partitions(10, 0.3, 1, 0, 1, available=[0, 2, 4, 6, 8])
    assert len(picked) == 3 and set(picked) <= {0, 2, 4, 6, 8}


@pytest.mark.parametrize("kwargs, match", [({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"),
                                           ({"available": [3, 10]}, "outside"),
                                           ({"server_round": -1}, "server_round")])
def test_bad_arguments_are_named(kwargs, match):
    args = {"num_partitions": 10, "fraction": 0.5, "min_nodes": 2, "seed": 0, "server_round": 1,
            **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_partitions(**args)


# --- the whoami protocol ------------------------------------------------------------------------
def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_client_answers_its_partition_id_and_nothing_else(flower_ids, tmp_path):
    """Through the whole ClientApp (mods included), also on a deployed node, whose other replies
    carry its arch, role and compute time: a whoami reply carries only the partition id."""
    files = {k: tmp_path / f"{k}.npz" for k in ("data", "public")}
    for path in files.values():
        path.touch()
    deployed = {"partition-id": 3, "data-path": str(files["data"]),
                "public-path": str(files["public"]), "arch": "mlp"}
    for node_config in ({"partition-id": 2, "num-partitions": 4}, deployed):
        out = client_app.app(request(RecordDict(), dst=7, message_type=WHOAMI), _context(node_config))
        assert not out.has_error(), out.error
        assert list(out.content.keys()) == ["metrics"]
        assert dict(out.content["metrics"]) == {"partition-id": node_config["partition-id"]}


def _whoami_grid(claims: dict[int, object], train_pid=None) -> tuple[WireGrid, FakeGrid]:
    """Nodes answer whoami with `claims[node]` (absent: no partition-id); train messages as
    partition `train_pid(node)`."""
    def answer(msg):
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == WHOAMI:
            if claims[node] is None:
                return reply(msg)
            return reply(msg, partition_id=claims[node])
        return reply(msg, partition_id=(train_pid or claims.get)(node))

    fake = FakeGrid(list(claims), answer=answer)
    return WireGrid(fake, poll_interval=0.0), fake


def _sent(fake: FakeGrid, message_type: str) -> list[tuple[str, int]]:
    return [(m.metadata.group_id, m.metadata.dst_node_id) for m in fake.pushed
            if m.metadata.message_type == message_type]


def test_server_asks_once_with_an_empty_message_then_samples_partitions(flower_ids, small_run):
    claims = {901: 3, 517: 0, 42: 2, 660: 1}  # random node ids, as Flower gives them
    node_of = {p: n for n, p in claims.items()}
    wire, fake = _whoami_grid(claims)
    strategy = bound(FedMD(fraction_train=0.5, min_available_nodes=1, wait_for_nodes_s=0, seed=0),
                     small_run.settings)
    config = small_run.settings.to_config()
    for rnd in (1, 2, 3):
        msgs = strategy.configure_train(rnd, ArrayRecord(), config, wire)
        expected = sample_partitions(4, 0.5, 2, 0, rnd)
        assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(node_of[p] for p in expected)
    asked = [m for m in fake.pushed if m.metadata.message_type == WHOAMI]
    assert sorted(m.metadata.dst_node_id for m in asked) == sorted(claims)  # once each, round 1
    assert {m.metadata.group_id for m in asked} == {"1"} and all(len(m.content) == 0 for m in asked)
    assert strategy.partitions.by_node == claims
    assert wire.waves[0].message_type == WHOAMI and wire.waves[0].bytes_down == 0


def test_in_simulation_the_engine_says_who_holds_what_and_nobody_is_asked(flower_ids, small_run):
    claims = {901: 3, 517: 0, 42: 2, 660: 1}
    node_of = {p: n for n, p in claims.items()}
    wire, fake = _whoami_grid(claims)
    strategy = bound(FedMD(fraction_train=0.5, min_available_nodes=1, wait_for_nodes_s=0, seed=0),
                     small_run.settings)
    strategy.engine_partitions = lambda: dict(claims)  # what the simulation engine assigned
    for rnd in (1, 2, 3):  # the same sample as when the nodes are asked (test above)
        msgs = strategy.configure_train(rnd, ArrayRecord(), small_run.settings.to_config(), wire)
        expected = sample_partitions(4, 0.5, 2, 0, rnd)
        assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(node_of[p] for p in expected)
    assert _sent(fake, WHOAMI) == [] and strategy.partitions.by_node == claims


def test_malformed_duplicate_and_out_of_range_answers_are_dropped(flower_ids, small_run, caplog):
    claims = {11: 0, 12: 0, 13: 1.5, 14: 9, 15: -1, 16: None, 17: 3, 18: 2}
    wire, fake = _whoami_grid(claims)
    strategy = bound(FedMD(fraction_train=0.5, min_train_nodes=1, min_available_nodes=1,
                           wait_for_nodes_s=0), small_run.settings)
    with caplog.at_level(logging.WARNING, logger="fedkd.strategies.partitions"):
        msgs = strategy.configure_train(1, ArrayRecord(), small_run.settings.to_config(), wire)
    assert strategy.partitions.by_node == {11: 0, 17: 3, 18: 2}  # partition 1 has no valid holder
    warnings = [r.getMessage() for r in caplog.records]
    for node, why in ((12, "=0 is held by node 11"), (13, "=1.5 is not an int in 0..3"),
                      (14, "=9 is not an int in 0..3"), (15, "=-1 is not an int in 0..3"),
                      (16, "=None is not an int in 0..3")):
        assert any(f"node {node}: metrics.partition-id{why}" in w for w in warnings), (node, warnings)
    assert any("5 free node(s) without a valid partition-id" in w for w in warnings)
    chosen = sample_partitions(4, 0.5, 1, 0, 1, available=[0, 2, 3])
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(
        {0: 11, 2: 18, 3: 17}[p] for p in chosen)


def test_whoami_waits_the_round_timeout_start_got_and_skips_a_silent_node(flower_ids, small_run):
    wire, fake = _whoami_grid({21: 0, 22: 1, 23: 2, 24: 3})
    fake.silent = {24}
    strategy = bound(FedMD(fraction_train=0.5, min_train_nodes=3, min_available_nodes=1,
                           wait_for_nodes_s=0), small_run.settings)
    config = ConfigRecord(small_run.settings.to_config())
    strategy.start(grid=wire, initial_arrays=ArrayRecord(), num_rounds=1, timeout=0.2,
                   train_config=config, evaluate_config=config)
    assert strategy.whoami_timeout_s is None and strategy.round_timeout_s == 0.2
    whoami, train = wire.waves
    assert (whoami.message_type, whoami.sent, whoami.timed_out) == (WHOAMI, 4, 1)
    assert whoami.seconds >= 0.2 and wire.busy_node_ids() == {24}
    assert _sent(fake, "train.distill") == [("1", 21), ("1", 22), ("1", 23)]  # 3 of 0, 1, 2


def test_replies_refresh_the_map_and_a_gone_node_frees_its_partition(flower_ids, small_run):
    pmap = PartitionMap()
    assert pmap.learn(5, 1, 4, 1) and not pmap.learn(6, 1, 4, 1, quiet=True)
    pmap.forget_gone([6, 7])  # node 5 left (a restarted node comes back under a new id)
    assert pmap.by_node == {} and pmap.learn(6, 1, 4, 2)
    msg = request(RecordDict(), dst=7)
    pmap.refresh([reply(msg, partition_id=2), reply(msg, error="boom")], 4, 3)
    assert pmap.by_node == {6: 1, 7: 2}


def test_full_participation_asks_nothing(flower_ids, small_run):
    wire, fake = _whoami_grid({11: 0, 12: 1, 13: 2, 14: 3})
    msgs = bound(FedMD(min_available_nodes=1, wait_for_nodes_s=0), small_run.settings).configure_train(
        1, ArrayRecord(), small_run.settings.to_config(), wire)
    assert len(msgs) == 4 and not fake.pushed


# --- every strategy samples the same partitions -------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: FedMD(fraction_train=0.5, min_available_nodes=1, wait_for_nodes_s=0, seed=5),
    lambda: FD(fraction_train=0.5, min_available_nodes=1, wait_for_nodes_s=0, seed=5),
    lambda: FedDF(fraction_train=0.5, min_available_nodes=1, wait_for_nodes_s=0, seed=5),
    lambda: FedAvg(fraction_train=0.5, min_available_nodes=1, wait_for_nodes_s=0, seed=5),
], ids=["fedmd", "fd", "feddf", "fedavg"])
def test_every_strategy_trains_the_same_partitions_whatever_the_node_ids(flower_ids, small_run, make):
    trained = []
    for offset in (100, 7000):  # two runs, other node ids
        claims = {offset + 13 * p: p for p in range(4)}
        wire, _ = _whoami_grid(claims)
        strategy = bound(make(), small_run.settings)
        rounds = []
        for rnd in (1, 2, 3):
            msgs = strategy.configure_train(rnd, ArrayRecord(),
                                            ConfigRecord(small_run.settings.to_config()), wire)
            rounds.append(sorted(claims[m.metadata.dst_node_id] for m in msgs))
        trained.append(rounds)
    assert trained[0] == trained[1] == [sample_partitions(4, 0.5, 2, 5, r) for r in (1, 2, 3)]


def test_feddf_gives_a_late_first_timer_its_architecture_s_model(flower_ids, small_run):
    """Partition 0 first trains in round 3: the whoami answer told FedDF its architecture."""
    claims = {400 + p: p for p in range(4)}
    wire, _ = _whoami_grid(claims)
    strategy = bound(FedDF(fraction_train=0.5, min_available_nodes=1, wait_for_nodes_s=0, seed=0),
                     small_run.settings)
    strategy.configure_train(1, ArrayRecord(), small_run.settings.to_config(), wire)
    arch = small_run.settings.arch_of(0)[0]
    models = ArrayRecord({f"{arch}/w": Array(np.zeros(2, np.float32))})
    msgs = strategy.configure_train(3, models, small_run.settings.to_config(), wire)
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    assert sorted(by_node) == [400, 403] and "arrays" in by_node[400].content
