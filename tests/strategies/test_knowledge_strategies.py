"""The relational and prototype strategies end to end in one process: the real ClientApp behind
the real wire mod, Flower's round loop on a WireGrid (its ReplyGuard checks every reply)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkd.client import app as client_app
from fedkd.client.wire_mod import wire_mod
from fedkd.aggregation import mean_probs
from fedkd.errors import ConfigError
from fedkd.strategies.fedproto import FedProto, mean_prototypes
from fedkd.strategies.relational import Relational, relation_rows
from fedkd.wire import WireGrid
from tests.conftest import reply
from tests.helpers import FakeGrid, bound

NODES = (11, 12, 13, 14)


def _settings(small_run, **train):
    return dataclasses.replace(small_run.settings,
                               train=dataclasses.replace(small_run.settings.train, **train))


def _run(strategy, settings, num_rounds=3):
    """Flower's round loop over nodes 11..14 (partitions 0..3) running the real ClientApp."""
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - NODES[0]},
                           state=RecordDict(), run_config={}) for n in NODES}
    seen: list[tuple[int, Message, Message]] = []

    def answer(msg: Message) -> Message:
        msg = copy.deepcopy(msg)
        TaskIdentity.node_id = msg.metadata.dst_node_id
        try:
            out = wire_mod(msg, contexts[msg.metadata.dst_node_id], client_app.distill)
        except Exception as err:  # noqa: BLE001 - as Flower's runtime: an error reply
            return reply(msg, error=f"{type(err).__name__}: {err}")
        finally:
            TaskIdentity.node_id = 1
        seen.append((int(msg.metadata.group_id), msg, out))
        return out

    fake = FakeGrid(list(NODES), answer=answer)
    config = ConfigRecord(settings.to_config())
    result = bound(strategy, settings).start(
        grid=WireGrid(fake, poll_interval=0.0), initial_arrays=ArrayRecord(),
        num_rounds=num_rounds, timeout=60, train_config=config, evaluate_config=config)
    return result, seen


RELATIONAL = dict(relation_rows=4096, losses={"kd": {"weight": 0.5}, "ce": {"weight": 0.5},
                                               "relation_kd": {"weight": 1.0, "temperature": 0.1}})


@pytest.mark.parametrize("relation_rows", [4096, 50])
def test_relational_round_trip_carries_relations_both_ways(flower_ids, small_run, relation_rows):
    settings = _settings(small_run, **{**RELATIONAL, "relation_rows": relation_rows})
    strategy = Relational(aggregator=mean_probs, relation_temperature=0.1, min_available_nodes=1,
                          wait_for_nodes_s=0)
    result, seen = _run(strategy, settings)

    rows = min(small_run.data.num_public, relation_rows)
    for rnd, request, out in seen:
        relation = out.content["knowledge"]["relation"].numpy()
        assert relation.shape == (rows, rows - 1) and np.abs(relation).max() <= 1 + 1e-5
        sent = request.content["transfer"]
        if rnd == 1:
            assert "targets.relation" not in sent
        else:  # the aggregate of last round: row distributions over the other rows
            target = sent["targets.relation"].numpy()
            assert target.shape == (rows, rows - 1)
            np.testing.assert_allclose(target.sum(1), 1.0, atol=1e-4)
            assert "digest-loss" in out.content["metrics"]
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]


def test_relational_aggregate_is_the_aggregator_over_similarity_rows(flower_ids, small_run):
    settings = _settings(small_run, relation_rows=4096, losses={
        "kd": {"weight": 0.5}, "ce": {"weight": 0.5},
        "relation_kd": {"weight": 1.0, "temperature": 0.25}})
    calls = []

    def spy(stacked, meta, temperature):
        calls.append((stacked.shape, temperature))
        return mean_probs(stacked, meta, temperature=temperature)

    _run(Relational(aggregator=spy, relation_temperature=0.25, temperature=3.0,
                    min_available_nodes=1, wait_for_nodes_s=0), settings, num_rounds=1)
    c, rows = small_run.data.num_classes, small_run.data.num_public
    assert calls == [((4, rows, c), 3.0), ((4, rows, rows - 1), 0.25)]


def test_relational_refuses_a_client_term_at_another_temperature(small_run):
    settings = _settings(small_run, **RELATIONAL)  # relation_kd at 0.1
    with pytest.raises(ConfigError, match="relation_kd.temperature=0.1"):
        Relational(aggregator=mean_probs, relation_temperature=0.5).bind(settings)


def test_relational_refuses_the_cosine_matching_term(small_run):
    settings = _settings(small_run, relation_rows=10, losses={"kd": {}, "relation": {}})
    with pytest.raises(ConfigError, match="use relation_kd"):
        Relational(aggregator=mean_probs).bind(settings)


def test_relation_rows_renormalises_and_keeps_empty_rows_empty():
    out = relation_rows(np.array([[1.0, 3.0], [0.0, 0.0], [-1.0, 2.0]]))
    np.testing.assert_allclose(out, [[0.25, 0.75], [0.0, 0.0], [0.0, 1.0]])


def test_relational_needs_clients_that_share_relations(small_run):
    with pytest.raises(ConfigError, match="relation_rows"):
        Relational(aggregator=mean_probs).bind(small_run.settings)


def test_relational_refuses_a_stateful_relation_aggregator():
    class Stateful:
        def __call__(self, logits, meta=None, *, temperature=1.0):
            return mean_probs(logits, meta, temperature=temperature)

        def state_dict(self):
            return {}

    with pytest.raises(ConfigError, match="state"):
        Relational(aggregator=Stateful())


def test_mean_prototypes_weighs_by_counts_and_skips_absent_classes():
    protos = np.array([[[1.0, 0.0], [0.0, 0.0]], [[3.0, 2.0], [5.0, 5.0]]])  # [K=2, C=2, P=2]
    counts = np.array([[1, 0], [3, 2]])
    means, total = mean_prototypes(protos, counts)
    np.testing.assert_allclose(means, [[2.5, 1.5], [5.0, 5.0]])
    assert total.tolist() == [4, 2]
    means, total = mean_prototypes(protos, np.zeros((2, 2)))
    assert not means.any() and not total.any()


@pytest.mark.parametrize("aggregator", [None, mean_probs], ids=["prototypes-only", "with-logits"])
def test_fedproto_round_trip(flower_ids, small_run, aggregator):
    settings = _settings(small_run, prototype_dim=8, losses={
        "kd": {"weight": 0.5}, "ce": {"weight": 0.5}, "prototype": {"weight": 1.0}})
    result, seen = _run(FedProto(aggregator=aggregator, min_available_nodes=1,
                                 wait_for_nodes_s=0), settings)

    c = small_run.data.num_classes
    for rnd, request, out in seen:
        knowledge = out.content["knowledge"]
        assert knowledge["prototypes"].numpy().shape == (c, 8)
        counts = knowledge["prototype-counts"].numpy()
        assert counts.sum() == out.content["metrics"]["num-examples"]
        assert ("logits" in out.content) == (aggregator is not None)
        sent = request.content["transfer"]
        assert ("prototypes" in sent) == (rnd > 1)
        if rnd > 1:
            assert sent["prototypes"].numpy().shape == (c, 8)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]


def test_fedproto_needs_a_prototype_width(small_run):
    with pytest.raises(ConfigError, match="prototype_dim"):
        FedProto().bind(small_run.settings)


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    from fedkd.server import compose_config, prepare_run

    cache = tmp_path_factory.mktemp("zoo-cache")
    return prepare_run(compose_config([
        "num_clients=4", "num_rounds=2", "model=zoo", "distill.warmup_epochs=1",
        "distill.digest_epochs=1", "dataset.public_size=64", f"simulation.cache_dir={cache}"]))


@pytest.mark.parametrize("name", ["relational", "fedproto"])
def test_the_zoo_mixes_through_the_knowledge_strategies(flower_ids, zoo_run, name):
    """ResNet-8 (block2), ResNet-20 (embedding), MobileNet (block3) and ViT (attention2): four
    architectures, four taps, one relation or prototype space."""
    assert [zoo_run.settings.arch_of(p)[0] for p in range(4)] == [
        "resnet8", "resnet20", "mobilenet", "vit"]
    if name == "relational":
        settings = _settings(zoo_run, **RELATIONAL)
        strategy = Relational(aggregator=mean_probs, relation_temperature=0.1,
                              min_available_nodes=1, wait_for_nodes_s=0)
    else:
        settings = _settings(zoo_run, prototype_dim=8, losses={
            "kd": {"weight": 0.5}, "ce": {"weight": 0.5}, "prototype": {"weight": 1.0}})
        strategy = FedProto(aggregator=mean_probs, min_available_nodes=1, wait_for_nodes_s=0)
    result, seen = _run(strategy, settings, num_rounds=2)
    assert sorted({rnd for rnd, _, _ in seen}) == [1, 2] and len(seen) == 8
    assert all("knowledge" in out.content and "digest-loss" in out.content["metrics"]
               for rnd, _, out in seen if rnd == 2)


def test_relational_propagation_sends_the_targets_smoothed_along_the_relations(flower_ids, small_run):
    import torch

    from fedkd.aggregation.propagation import propagate
    from fedkd.losses.relation_kd import full_relation

    settings = _settings(small_run, **RELATIONAL)
    soft = []

    def spy(stacked, meta, temperature):
        out = mean_probs(stacked, meta, temperature=temperature)
        if temperature == 3.0:  # the logits' call (the relations' is at 0.1)
            soft.append(out)
        return out

    _, seen = _run(Relational(aggregator=spy, relation_temperature=0.1, temperature=3.0,
                              propagation=0.5, min_available_nodes=1, wait_for_nodes_s=0),
                   settings, num_rounds=2)
    sent = next(req.content["transfer"] for rnd, req, _ in seen if rnd == 2)
    relation = sent["targets.relation"].numpy()
    expected = propagate(soft[0], full_relation(torch.from_numpy(relation)).numpy(), 0.5)
    np.testing.assert_allclose(sent["targets.probs"].numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, soft[0], atol=1e-4)  # the smoothing did something


@pytest.mark.parametrize("weight", [-0.5, 2.0])
def test_relational_refuses_a_propagation_outside_unit_interval(weight):
    with pytest.raises(ConfigError, match="propagation"):
        Relational(aggregator=mean_probs, propagation=weight)


def test_relational_without_a_relation_term_sends_only_the_propagated_targets(flower_ids, small_run):
    losses = {**RELATIONAL["losses"], "relation_kd": {"weight": 0.0, "temperature": 0.1}}
    settings = _settings(small_run, **{**RELATIONAL, "losses": losses})
    _, seen = _run(Relational(aggregator=mean_probs, relation_temperature=0.1, propagation=0.5,
                              min_available_nodes=1, wait_for_nodes_s=0), settings, num_rounds=2)
    for rnd, request, out in seen:
        assert "relation" in out.content["knowledge"]  # the clients still send theirs
        sent = request.content["transfer"]
        assert "targets.relation" not in sent  # no client term would read it
        assert ("targets.probs" in sent) == (rnd == 2)


def test_relational_refuses_relations_that_nothing_uses(small_run):
    losses = {**RELATIONAL["losses"], "relation_kd": {"weight": 0.0, "temperature": 0.1}}
    settings = _settings(small_run, **{**RELATIONAL, "losses": losses})
    with pytest.raises(ConfigError, match="strategy.flower.propagation"):
        Relational(aggregator=mean_probs, relation_temperature=0.1).check_train(settings.train)
    Relational(aggregator=mean_probs, relation_temperature=0.1,
               propagation=0.5).check_train(settings.train)  # propagation uses them


def test_relational_top_k_relations_reach_the_aggregator_dense_and_filled_with_minus_one(
        flower_ids, small_run):
    settings = _settings(small_run, **{**RELATIONAL, "relation_topk": 3})
    stacked = []

    def spy(array, meta, temperature):
        if temperature == 0.1:  # the relations' call
            stacked.append(array)
        return mean_probs(array, meta, temperature=temperature)

    _, seen = _run(Relational(aggregator=spy, relation_temperature=0.1, min_available_nodes=1,
                              wait_for_nodes_s=0), settings, num_rounds=1)
    rows = small_run.data.num_public
    replies = sorted((out for _, _, out in seen), key=lambda m: m.metadata.src_node_id)
    for k, out in enumerate(replies):
        values = out.content["knowledge"]["relation"].numpy()
        index = out.content["knowledge"]["relation-index"].numpy()
        assert values.shape == index.shape == (rows, 3) and index.dtype == np.int16
        dense = np.full((rows, rows - 1), -1.0, np.float32)
        np.put_along_axis(dense, index.astype(np.int64), values, axis=1)
        np.testing.assert_array_equal(stacked[0][k], dense)
