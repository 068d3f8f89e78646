"""Generators inside strategies: what a black-box query wave sends and gets back (through the
real ClientApp handler), and FedDF fitting a white-box generator on the uploaded models."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, RecordDict

from fedkd.client.wire_mod import SETTINGS_STATE, wire_mod
from fedkd.client import app as client_app
from fedkd.client.state import Student
from fedkd.errors import ConfigError
from fedkd.generators import BlackBoxGenerator, WhiteBoxGenerator
from fedkd.generators.base import models_query
from fedkd.protocol import query_directions
from fedkd.wire import WireGrid
from fedkd.strategies.dsfl import DSFL
from fedkd.strategies.fedmd import FedMD
from tests.strategies.test_feddf import _round_one, _strategy
from tests.helpers import FakeGrid
from tests.helpers import bound


def test_a_white_box_generator_needs_a_strategy_that_holds_the_models():
    for strategy in (FedMD, DSFL):
        with pytest.raises(ConfigError, match="strategy=feddf"):
            strategy(transfer=WhiteBoxGenerator())


def _client_grid(small_run):
    """A grid whose nodes 11..14 (partitions 0..3) answer with the real ClientApp handlers."""
    contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 11},
                              state=RecordDict(), run_config={}) for node in (11, 12, 13, 14)}
    handlers = {"query": client_app.query, "train.distill": client_app.distill}
    fake = FakeGrid(list(contexts),
                    answer=lambda m: wire_mod(m, contexts[m.metadata.dst_node_id],
                                              handlers[m.metadata.message_type]))
    grid = WireGrid(fake, poll_interval=0.0)
    waves = []
    grid.observers.append(lambda rnd, replies, stats: waves.append((stats, list(replies))))
    return grid, fake, contexts, waves


def test_black_box_query_waves_send_inputs_and_a_seed_and_get_logits_only(flower_ids, small_run):
    settings = small_run.settings
    source = BlackBoxGenerator(size=20, steps=2, batch_size=8, directions=3, mu=0.1, seed=0)
    strategy = FedMD(transfer=source, min_available_nodes=1, wait_for_nodes_s=0)
    grid, fake, contexts, waves = _client_grid(small_run)

    train = bound(strategy, settings).configure_train(2, ArrayRecord(), settings.to_config(), grid)

    queries = [m for m in fake.pushed if m.metadata.message_type == "query"]
    assert len(queries) == 2 * 4 and len(waves) == 2
    shape = tuple(small_run.data.input_shape)
    for msg in queries:
        assert set(msg.content.keys()) == {"config", "query"}
        assert list(msg.content["query"].keys()) == ["query.inputs"]
        inputs = msg.content["query"]["query.inputs"].numpy()
        assert inputs.shape == (8, *shape) and inputs.dtype == np.float32  # no perturbed copies
        assert msg.content["config"]["query-directions"] == 3
    students = [Student.restore(contexts[n], settings, n - 11).model for n in sorted(contexts)]
    for stats, replies in waves:
        assert stats.replied == 4 and stats.errors == 0
        first = next(q for q in queries if q.metadata.message_id in {r.metadata.reply_to_message_id for r in replies})
        config = first.content["config"]
        expected = models_query(students)(first.content["query"]["query.inputs"].numpy(),
                                          int(config["query-seed"]), 3, 0.1)
        for reply in replies:
            assert set(reply.content.keys()) == {"logits", "metrics"}
            assert set(reply.content["metrics"].keys()) == {"partition-id", "num-examples"}
            pid = int(reply.content["metrics"]["partition-id"])
            np.testing.assert_array_equal(reply.content["logits"]["logits"].numpy(), expected[pid])
    # a query keeps nothing but the settings document (sent once, then named by digest)
    assert all(set(ctx.state.keys()) == {SETTINGS_STATE} for ctx in contexts.values())
    assert source.steps_done == 2 and source.queries == 2 * 8 * 4
    for msg in train:
        assert msg.content["transfer"]["next.inputs"].numpy().shape == (20, *shape)


def test_black_box_generator_waits_for_trained_teachers_and_its_budget(flower_ids, small_run):
    source = BlackBoxGenerator(size=20, steps=5, batch_size=8, directions=3, seed=0,
                               query_budget=8 * 4 * 3)
    strategy = FedMD(transfer=source, min_available_nodes=1, wait_for_nodes_s=0)
    grid, fake, _, _ = _client_grid(small_run)
    bound(strategy, small_run.settings).configure_train(1, ArrayRecord(), small_run.settings.to_config(), grid)
    assert not [m for m in fake.pushed if m.metadata.message_type == "query"]  # round 1: untrained
    bound(strategy, small_run.settings).configure_train(2, ArrayRecord(), small_run.settings.to_config(), grid)
    assert sum(m.metadata.message_type == "query" for m in fake.pushed) == 3 * 4  # 3 waves fit


def test_query_directions_are_what_the_client_adds():
    u = query_directions(5, 2, (3, 4))
    assert u.shape == (2, 3, 4) and u.dtype == np.float32
    np.testing.assert_array_equal(u, query_directions(5, 2, (3, 4)))


def test_feddf_fits_a_white_box_generator_on_the_uploads_and_distils_on_its_samples(
        flower_ids, small_run, tmp_path):
    source = WhiteBoxGenerator(size=50, steps=3, batch_size=16, seed=0)
    strategy = _strategy(server_epochs=1, transfer=source)
    strategy.set_output_dir(tmp_path)
    metrics = {}
    strategy.server_metric_sinks.append(lambda rnd, values: metrics.update(values))
    _, (arrays, _) = _round_one(strategy, small_run)
    assert arrays is not None and source.steps_done == 3
    assert {"gen-ce", "gen-bn", "gen-agree", "server-kd-before", "server-kd-after"} <= set(metrics)
    assert (tmp_path / "generator.pt").exists()


def test_feddf_answers_a_black_box_generator_from_the_uploaded_models(flower_ids, small_run):
    source = BlackBoxGenerator(size=30, steps=2, batch_size=8, directions=2, start_round=1, seed=0)
    strategy = _strategy(server_epochs=1, transfer=source)
    _, (arrays, _) = _round_one(strategy, small_run)
    assert arrays is not None and source.steps_done == 2 and source.queries == 2 * 8 * 3
