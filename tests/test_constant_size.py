"""Constant-size messages: the settings travel once per node, the rows a node answered on are not
sent back to it, public rows travel as packed bits, and no message grows with the number of
clients (`fedkd.compact`, `fedkd.wire_cache`, `fedkd.client.wire_mod`)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedkd.client.wire_mod import NotHeld, wire_mod
from fedkd.compact import compact, expand
from fedkd.errors import ConfigError
from fedkd.protocol import decode_rows, encode_rows, text_digest
from fedkd.records import rows_of, transfer_record
from fedkd.settings import ClientSettings
from fedkd.wire import WireGrid, content_bytes
from tests.conftest import reply, request
from tests.helpers import FakeGrid


# --- pure pieces -----------------------------------------------------------------------------
def test_compact_finds_the_cycle_and_the_exceptions():
    names = ["a", "b"] * 3 + ["t"]
    form = compact(names)
    assert form == {"n": 7, "cycle": ["a", "b"], "except": {"6": "t"}}
    assert expand(form, "x") == names
    assert compact(["s"] * 50_000) == {"n": 50_000, "cycle": ["s"], "except": {}}
    assert expand(compact([]), "x") == [] and expand(["p", "q"], "x") == ["p", "q"]


@pytest.mark.parametrize("form", [
    {"n": 3, "cycle": [], "except": {}}, {"n": -1, "cycle": ["a"], "except": {}},
    {"n": 10**9, "cycle": ["a"], "except": {}}, {"n": 2, "cycle": ["a"], "except": {"2": "b"}},
    {"n": 2, "cycle": ["a"], "except": {"x": "b"}}, {"n": 2, "cycle": [1], "except": {}},
    {"n": 2, "cycle": ["a"]}, "a", 3,
])
def test_expand_refuses_malformed_forms(form):
    with pytest.raises(ConfigError, match="settings.assignment"):
        expand(form, "settings.assignment")


def test_rows_travel_as_bits_indices_or_inputs():
    kind, bits = encode_rows(np.array([0, 2, 3, 9]))
    assert kind == "mask" and bits.dtype == np.uint8 and bits.tolist() == [0b1101, 0b10]
    np.testing.assert_array_equal(decode_rows(kind, bits), [0, 2, 3, 9])
    kind, idx = encode_rows(np.array([5, 1, 300]))
    assert kind == "indices" and idx.dtype == np.uint16 and idx.tolist() == [5, 1, 300]
    kind, x = encode_rows(np.ones((2, 3), dtype=np.float64))
    assert kind == "inputs" and x.dtype == np.float32
    assert encode_rows(np.arange(400))[1].nbytes == 50  # the whole digits public set: 50 bytes
    for kind, bad in [("mask", np.zeros(3, np.int64)), ("indices", np.zeros((2, 2), np.int64)),
                      ("inputs", np.zeros(3, np.float32)), ("pickle", np.zeros(3))]:
        with pytest.raises(ValueError, match="rows"):
            decode_rows(kind, bad)


def _with_partitions(settings: ClientSettings, n: int) -> ClientSettings:
    archs = sorted(settings.archs)
    data = {**settings.data, "client_sizes": [7] * n, "class_histograms": [[1] * 7] * n}
    return dataclasses.replace(settings, data=data, roles=["student"] * n,
                               assignment=[archs[i % len(archs)] for i in range(n)])


def test_the_settings_document_does_not_grow_with_the_clients(small_run):
    sizes = {n: len(_with_partitions(small_run.settings, n).to_json()) for n in (4, 100, 10_000)}
    assert max(sizes.values()) - min(sizes.values()) <= 8  # the digits of n, nothing per client
    big = _with_partitions(small_run.settings, 10_000)
    back = ClientSettings.from_json(big.to_json())
    assert back.assignment == big.assignment and back.roles == big.roles
    assert "client_sizes" not in back.data  # server-only: replies are checked against them


# --- the wire: held values -------------------------------------------------------------------
class Nodes:
    """Fake nodes 1..3 (partitions 0..2) behind the real `wire_mod`; the handler records what it
    saw after the mod restored it, and answers logits on the asked rows."""

    def __init__(self, small_run) -> None:
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                                    state=RecordDict(), run_config={}) for n in (1, 2, 3)}
        self.seen: list[tuple[int, dict, dict]] = []
        self.classes = small_run.data.num_classes
        self.fake = FakeGrid(list(self.contexts), answer=self.answer)
        self.wire = WireGrid(self.fake, poll_interval=0.0)

    def handler(self, msg: Message, context: Context) -> Message:
        config, transfer = msg.content["config"], msg.content["transfer"]
        settings = ClientSettings.from_config(config)
        self.seen.append((msg.metadata.dst_node_id, dict(config),
                          {k: rows_of(transfer, k) for k in ("targets", "next")}))
        rows = len(rows_of(transfer, "next"))
        assert settings.num_rounds >= 1
        return reply(msg, logits=np.zeros((rows, self.classes), np.float32),
                     partition_id=context.node_config["partition-id"])

    def answer(self, msg: Message) -> Message:
        msg = copy.deepcopy(msg)  # what a node gets is its own copy (Flower serialises it)
        try:
            return wire_mod(msg, self.contexts[msg.metadata.dst_node_id], self.handler)
        except Exception as err:  # Flower's runtime turns it into an error reply
            return reply(msg, error=f"{type(err).__name__}: {err}")

    def wave(self, settings, server_round, nodes=(1, 2, 3), targets=None, rows=None):
        rows = np.arange(10) + server_round if rows is None else rows
        transfer = transfer_record(
            soft_targets=None if targets is None else np.full((len(targets), self.classes),
                                                              1 / self.classes, np.float32),
            target_rows=targets, next_rows=rows)
        content = RecordDict({"config": ConfigRecord({**settings.to_config(),
                                                      "server-round": server_round}),
                              "transfer": transfer})
        return self.wire.send_and_receive(
            [request(content, dst=n, server_round=server_round) for n in nodes], timeout=5)


def test_settings_travel_once_then_by_digest(flower_ids, small_run):
    nodes, settings = Nodes(small_run), small_run.settings
    nodes.wave(settings, 1)
    nodes.wave(settings, 2)
    first, second = nodes.fake.pushed[:3], nodes.fake.pushed[3:]
    digest = text_digest(settings.to_json())
    assert all(m.content["config"]["fedkd.settings"] == settings.to_json() for m in first)
    assert all("fedkd.settings" not in m.content["config"] for m in second)
    assert all(m.content["config"]["fedkd.settings-digest"] == digest for m in first + second)
    assert all(cfg["fedkd.settings"] == settings.to_json() for _, cfg, _ in nodes.seen)  # restored
    assert nodes.wire.waves[1].bytes_down < nodes.wire.waves[0].bytes_down - 3 * 500


def test_a_node_that_lost_what_it_held_errs_once_then_gets_everything(flower_ids, small_run):
    nodes, settings = Nodes(small_run), small_run.settings
    nodes.wave(settings, 1)
    nodes.contexts[2].state = RecordDict()  # node 2 restarted: its Context.state is gone
    second = {r.metadata.src_node_id: r for r in nodes.wave(settings, 2)}
    assert [second[n].has_error() for n in (1, 2, 3)] == [False, True, False]
    assert "NotHeld" in second[2].error.reason and "sends them again" in second[2].error.reason
    nodes.wave(settings, 3)
    third = {m.metadata.dst_node_id: m for m in nodes.fake.pushed[6:]}
    assert "fedkd.settings" in third[2].content["config"]
    assert "fedkd.settings" not in third[1].content["config"]


def test_a_changed_document_is_sent_again(flower_ids, small_run):
    nodes, settings = Nodes(small_run), small_run.settings
    nodes.wave(settings, 1)
    other = dataclasses.replace(settings, num_rounds=settings.num_rounds + 1)
    nodes.wave(other, 2)
    assert all(m.content["config"]["fedkd.settings"] == other.to_json()
               for m in nodes.fake.pushed[3:])


def test_rows_a_node_answered_on_are_not_sent_back(flower_ids, small_run):
    nodes, settings = Nodes(small_run), small_run.settings
    asked = np.array([3, 5, 8, 13])
    nodes.wave(settings, 1, nodes=(1, 2), rows=asked)
    nodes.wave(settings, 2, targets=asked)
    second = {m.metadata.dst_node_id: m for m in nodes.fake.pushed[2:]}
    for node in (1, 2):  # answered round 1: the targets' rows are named by digest
        assert set(second[node].content["transfer"].keys()) == {"targets.probs", "next.mask"}
        assert "fedkd.targets-rows" in second[node].content["config"]
    assert "targets.mask" in second[3].content["transfer"]  # node 3 was not asked in round 1
    seen = {node: rows for node, cfg, rows in nodes.seen if cfg["server-round"] == 2}
    for node in (1, 2, 3):
        np.testing.assert_array_equal(seen[node]["targets"], asked)


def test_synthetic_inputs_travel_once_per_round(flower_ids, small_run):
    nodes, settings = Nodes(small_run), small_run.settings
    shape = tuple(small_run.data.input_shape)
    inputs = [np.random.default_rng(r).random((6, *shape), dtype=np.float32) for r in (1, 2)]
    nodes.wave(settings, 1, rows=inputs[0])
    nodes.wave(settings, 2, targets=inputs[0], rows=inputs[1])
    for msg in nodes.fake.pushed[3:]:
        assert list(msg.content["transfer"].keys()) == ["targets.probs", "next.inputs"]
    seen = [rows for _, cfg, rows in nodes.seen if cfg["server-round"] == 2]
    assert all(np.array_equal(r["targets"], inputs[0]) for r in seen)
    per_node = nodes.wire.waves[1].bytes_down / 3
    assert per_node < inputs[0].nbytes * 1.5  # one copy of the inputs, not two


def test_a_digest_the_node_does_not_hold_is_refused(flower_ids, small_run):
    settings, ctx = small_run.settings, Context(run_id=1, node_id=1, node_config={
        "partition-id": 0}, state=RecordDict(), run_config={})
    config = ConfigRecord({"fedkd.settings-digest": "0" * 32, "server-round": 2})
    msg = request(RecordDict({"config": config, "transfer": ArrayRecord()}), dst=1)
    with pytest.raises(NotHeld, match="holds no such settings"):
        wire_mod(msg, ctx, lambda m, c: pytest.fail("the handler ran"))
    sent = ConfigRecord({"fedkd.settings": settings.to_json(), "fedkd.settings-digest": "1" * 32})
    msg = request(RecordDict({"config": sent, "transfer": ArrayRecord()}), dst=1)
    with pytest.raises(NotHeld, match="not the digest"):
        wire_mod(msg, ctx, lambda m, c: pytest.fail("the handler ran"))
    held = ConfigRecord({"fedkd.settings": settings.to_json(), "fedkd.targets-rows": "2" * 32})
    msg = request(RecordDict({"config": held, "transfer": ArrayRecord(
        {"next.mask": Array(np.ones(2, np.uint8))})}), dst=1)
    with pytest.raises(NotHeld, match="holds no such rows"):
        wire_mod(msg, ctx, lambda m, c: pytest.fail("the handler ran"))


def test_a_round_message_has_the_same_size_at_100_and_10000_clients(flower_ids, small_run):
    sizes = {}
    for n in (100, 10_000):
        settings = _with_partitions(small_run.settings, n)
        content = RecordDict({"config": ConfigRecord({**settings.to_config(), "server-round": 3}),
                              "transfer": transfer_record(next_rows=np.arange(400))})
        sizes[n] = content_bytes(content)
    assert abs(sizes[10_000] - sizes[100]) <= 0.01 * sizes[100]



def test_long_lists_are_logged_briefly():
    from fedkd.compact import brief

    assert brief(list(range(5))) == "[0, 1, 2, 3, 4]"
    assert brief(list(range(1000)), limit=6) == "[0, 1, 2, 3, ..., 998, 999] (1000 items)"
