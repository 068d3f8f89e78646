"""The codec on the wire (`fedkd.wire_codec`): what travels is encoded, what handlers and
strategies read is decoded, the bytes counted are the encoded ones, and a reply whose encoded
parts are malformed is dropped with a warning naming the node and the field."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedkd.checks import check_run
from fedkd.client.wire_mod import wire_mod
from fedkd.errors import ConfigError
from fedkd.records import transfer_record
from fedkd.server import compose_config
from fedkd.wire import WireGrid
from fedkd.wire_codec import WireCodec, decode_weights, encode_weights
from tests.conftest import reply, request
from tests.helpers import FakeGrid


class CodecNodes:
    """Nodes 1, 2 behind the real `wire_mod`; the handler records the soft targets it read and
    answers fixed logits (or, for `raw`, an already-encoded hostile reply)."""

    def __init__(self, small_run, spec: dict, raw: dict | None = None) -> None:
        self.c = small_run.data.num_classes
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                                    state=RecordDict(), run_config={}) for n in (1, 2)}
        self.logits = np.random.default_rng(0).normal(0, 3, (8, self.c)).astype(np.float32)
        self.seen: list[np.ndarray] = []
        self.raw = raw
        self.fake = FakeGrid(list(self.contexts), answer=self.answer)
        self.wire = WireGrid(self.fake, poll_interval=0.0, codec=WireCodec.of(spec, self.c))

    def handler(self, msg: Message, context: Context) -> Message:
        transfer = msg.content["transfer"]
        if "targets.probs" in transfer:
            self.seen.append(transfer["targets.probs"].numpy())
        out = reply(msg, logits=self.logits, partition_id=context.node_config["partition-id"])
        if self.raw is not None and msg.metadata.dst_node_id == 2:
            out.content["logits"] = ArrayRecord(array_dict={
                f"logits|{k}": Array(v) for k, v in self.raw.items()})
            return out  # sent as it is, not encoded by the mod
        return out

    def answer(self, msg: Message) -> Message:
        msg = copy.deepcopy(msg)
        return wire_mod(msg, self.contexts[msg.metadata.dst_node_id], self.handler)

    def wave(self, settings, probs: np.ndarray | None = None):
        rows = np.arange(8)
        content = RecordDict({
            "config": ConfigRecord({**settings.to_config(), "server-round": 1}),
            "transfer": transfer_record(soft_targets=probs, target_rows=None if probs is None
                                        else rows, next_rows=rows)})
        return self.wire.send_and_receive([request(content, dst=n) for n in (1, 2)], timeout=5)


def _probs(c: int) -> np.ndarray:
    z = np.random.default_rng(1).normal(0, 2, (8, c))
    return (np.exp(z) / np.exp(z).sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("spec", [{"name": "int8"}, {"name": "float16"},
                                  {"name": "topk", "k": 3, "temperature": 2.0},
                                  {"name": "hard_label", "temperature": 2.0}])
def test_both_directions_travel_encoded_and_arrive_decoded(flower_ids, small_run, spec):
    nodes = CodecNodes(small_run, spec)
    probs = _probs(nodes.c)
    replies = nodes.wave(small_run.settings, probs)
    pushed = nodes.fake.pushed[0]
    assert "targets.probs" not in pushed.content["transfer"]
    assert f"targets.probs|{spec['name']}" in pushed.content["transfer"]  # one packed array
    assert pushed.content["config"]["fedkd.codec"].startswith("{")
    for seen in nodes.seen:  # the handler read a distribution close to the one sent
        np.testing.assert_allclose(seen.sum(axis=1), 1.0, atol=1e-5)
        assert (seen.argmax(1) == probs.argmax(1)).all()
    for r in replies:  # the strategy reads float32 logits of the asked shape
        logits = r.content["logits"]["logits"].numpy()
        assert logits.dtype == np.float32 and logits.shape == (8, nodes.c)
        assert (logits.argmax(1) == nodes.logits.argmax(1)).all()
    stats = nodes.wire.waves[0]
    assert stats.bytes_up < 2 * (nodes.logits.nbytes + 200)  # counted encoded


def test_int8_logits_come_back_within_half_a_step(flower_ids, small_run):
    nodes = CodecNodes(small_run, {"name": "int8"})
    logits = nodes.wave(small_run.settings)[0].content["logits"]["logits"].numpy()
    step = np.abs(nodes.logits).max(axis=1, keepdims=True) / 127
    assert (np.abs(logits - nodes.logits) <= step / 2 + 1e-6).all()


def _packed(shape, values, scale):
    head = np.concatenate([np.array([len(shape)], np.uint8), np.asarray(shape, "<u4").view(np.uint8)])
    return np.concatenate([head, scale.view(np.uint8), values.view(np.uint8).reshape(-1)])


@pytest.mark.parametrize(("raw", "field"), [
    ({"int8": np.zeros(5, np.float32)}, "packed uint8"),
    ({"int8": _packed((8, 10), np.zeros((8, 10), np.int8), np.ones(8, np.float32))[:-3]}, "bytes"),
    ({"int8": _packed((3, 10), np.zeros((3, 10), np.int8), np.ones(3, np.float32))}, "shape"),
    ({"int8": _packed((8, 10), np.zeros((8, 10), np.int8), np.full(8, np.nan, np.float32))},
     "scale"),
    ({"float16": np.zeros(5, np.uint8)}, "not encoded with the run's codec"),
])
def test_a_malformed_encoded_reply_is_dropped_naming_node_and_field(
        flower_ids, small_run, caplog, raw, field):
    nodes = CodecNodes(small_run, {"name": "int8"}, raw=raw)
    with caplog.at_level(logging.WARNING, logger="fedkd.wire"):
        replies = nodes.wave(small_run.settings)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert nodes.wire.waves[0].dropped == 1
    warning = next(r.getMessage() for r in caplog.records if "dropped" in r.getMessage())
    assert "node 2" in warning and field in warning


def test_weights_round_trip_in_order_with_integer_buffers_untouched():
    record = ArrayRecord(array_dict={
        "conv.weight": Array(np.random.default_rng(0).normal(size=(4, 3, 2)).astype(np.float32)),
        "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),
        "fc.bias": Array(np.linspace(-1, 1, 5).astype(np.float32))})
    for spec, tol in (({"name": "float16"}, 1e-3), ({"name": "int8"}, 2.0 / 127)):
        sent = encode_weights(spec, record)
        assert "conv.weight" not in sent and f"conv.weight|{spec['name']}" in sent
        assert sent["bn.num_batches_tracked"].numpy().dtype == np.int64  # as it was
        back = decode_weights(spec, sent, "arrays")
        assert list(back.keys()) == list(record.keys())
        for key in record.keys():
            np.testing.assert_allclose(back[key].numpy(), record[key].numpy(), atol=tol)
    assert encode_weights({"name": "topk", "k": 2}, record) is record  # not for weights


def test_codec_none_encodes_nothing():
    assert WireCodec.of({"name": "none"}, 10) is None and WireCodec.of(None, 10) is None


@pytest.mark.parametrize(("overrides", "key"), [
    (["codec=topk", "codec.k=0"], "codec.k"), (["codec.name=zip"], "codec.name"),
    (["+codec.level=3"], "codec.level"),
])
def test_a_bad_codec_stops_the_run_before_it_starts(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_run(compose_config(overrides))


@pytest.mark.parametrize(("spec", "nbytes"), [
    ({"name": "float16"}, 8000), ({"name": "int8"}, 4000 + 1600),
    ({"name": "topk", "k": 2}, 400 * 2 * 3), ({"name": "hard_label"}, 800)])
def test_a_payload_is_one_array_of_its_parts_and_a_9_byte_shape(spec, nbytes):
    from fedkd import codecs
    from fedkd.wire_codec import pack, unpack

    z = np.random.default_rng(0).normal(size=(400, 10)).astype(np.float32)
    parts = codecs.encode_logits(spec, z)
    assert {k: (v.dtype, v.shape) for k, v in parts.items()} == codecs.layout(spec, z.shape)
    buffer = pack(spec, z.shape, parts)
    assert buffer.dtype == np.uint8 and buffer.nbytes == nbytes + 9
    shape, back = unpack(spec, buffer, "logits")
    assert shape == (400, 10) and all(np.array_equal(back[k], parts[k]) for k in parts)
