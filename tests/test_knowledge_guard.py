"""The ``knowledge`` record of a reply (relations, prototypes) is checked like everything else:
a malformed one drops the reply with one warning naming the node and the field."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from tests.test_reply_guard import C, Wave, assert_dropped, honest

ROWS, P = 5, 4


def _settings(small_run, **train):
    return dataclasses.replace(small_run.settings,
                               train=dataclasses.replace(small_run.settings.train, **train))


class KnowledgeWave(Wave):
    """Honest nodes also send what the run asks for: relations and/or prototypes."""

    def _answer(self, msg):
        node = msg.metadata.dst_node_id
        out = honest(msg, self.settings, self.pid_of[node])
        size = self.settings.data["client_sizes"][self.pid_of[node]]
        record = ArrayRecord()
        if self.settings.train.relation_rows:
            k = self.settings.train.relation_topk or ROWS - 1
            record["relation"] = Array(np.full((ROWS, k), 0.5, np.float32))
            if self.settings.train.relation_topk:
                record["relation-index"] = Array(np.tile(np.arange(k, dtype=np.int16), (ROWS, 1)))
        if self.settings.train.prototype_dim:
            counts = np.zeros(C, np.int64)
            counts[0] = size
            record["prototypes"] = Array(np.ones((C, P), np.float32))
            record["prototype-counts"] = Array(counts)
        out.content["knowledge"] = record
        if node in self.tamper:
            self.tamper[node](out)
        return out


@pytest.fixture
def relation_wave(flower_ids, small_run, tmp_path):
    return KnowledgeWave(_settings(small_run, relation_rows=100), tmp_path)


@pytest.fixture
def proto_wave(flower_ids, small_run, tmp_path):
    return KnowledgeWave(_settings(small_run, prototype_dim=P), tmp_path)


def test_honest_knowledge_passes(relation_wave, proto_wave):
    assert len(relation_wave.send(rows=ROWS)) == 4
    assert len(proto_wave.send(rows=ROWS)) == 4


BAD_RELATIONS = {
    "shape": np.zeros((ROWS, ROWS), np.float32),
    "nan": np.full((ROWS, ROWS - 1), math.nan, np.float32),
    "not cosine": np.full((ROWS, ROWS - 1), 3.0, np.float32),
    "ints": np.zeros((ROWS, ROWS - 1), np.int64),
}


@pytest.mark.parametrize("case", list(BAD_RELATIONS))
def test_a_bad_relation_is_dropped(relation_wave, caplog, case):
    relation_wave.tamper[102] = lambda r: r.content["knowledge"].__setitem__(
        "relation", Array(BAD_RELATIONS[case]))
    assert_dropped(relation_wave, relation_wave.send(rows=ROWS), caplog, 102, "knowledge.relation")


def test_a_missing_relation_is_dropped(relation_wave, caplog):
    relation_wave.tamper[103] = lambda r: r.content["knowledge"].__delitem__("relation")
    assert_dropped(relation_wave, relation_wave.send(rows=ROWS), caplog, 103,
                   "knowledge.relation is missing")


def test_knowledge_the_run_did_not_ask_for_is_dropped(relation_wave, caplog):
    relation_wave.tamper[101] = lambda r: r.content["knowledge"].__setitem__(
        "prototypes", Array(np.ones((C, P), np.float32)))
    assert_dropped(relation_wave, relation_wave.send(rows=ROWS), caplog, 101,
                   "knowledge.prototypes was not asked for")


def test_prototype_counts_beyond_the_partition_are_dropped(proto_wave, caplog):
    proto_wave.tamper[104] = lambda r: r.content["knowledge"].__setitem__(
        "prototype-counts", Array(np.full(C, 10**6, np.int64)))
    assert_dropped(proto_wave, proto_wave.send(rows=ROWS), caplog, 104,
                   "knowledge.prototype-counts")


def test_infinite_prototypes_are_dropped(proto_wave, caplog):
    proto_wave.tamper[102] = lambda r: r.content["knowledge"].__setitem__(
        "prototypes", Array(np.full((C, P), np.inf, np.float32)))
    assert_dropped(proto_wave, proto_wave.send(rows=ROWS), caplog, 102, "knowledge.prototypes")


@pytest.fixture
def topk_wave(flower_ids, small_run, tmp_path):
    return KnowledgeWave(_settings(small_run, relation_rows=100, relation_topk=2), tmp_path)


BAD_INDEX = {
    "outside": (np.full((ROWS, 2), ROWS - 1, np.int16), "outside"),
    "negative": (np.full((ROWS, 2), -1, np.int16), "outside"),
    "twice": (np.zeros((ROWS, 2), np.int16), "twice"),
    "floats": (np.zeros((ROWS, 2), np.float32), "integers"),
    "shape": (np.zeros((ROWS, 3), np.int16), "shape"),
}


def test_honest_top_k_relations_pass(topk_wave):
    assert len(topk_wave.send(rows=ROWS)) == 4


@pytest.mark.parametrize("case", list(BAD_INDEX))
def test_a_bad_top_k_column_list_is_dropped(topk_wave, caplog, case):
    array, words = BAD_INDEX[case]
    topk_wave.tamper[102] = lambda r: r.content["knowledge"].__setitem__(
        "relation-index", Array(array))
    assert_dropped(topk_wave, topk_wave.send(rows=ROWS), caplog, 102, "knowledge.relation-index")
    assert words in caplog.text


def test_a_full_relation_where_top_k_was_asked_is_dropped(topk_wave, caplog):
    topk_wave.tamper[101] = lambda r: r.content["knowledge"].__setitem__(
        "relation", Array(np.full((ROWS, ROWS - 1), 0.5, np.float32)))
    assert_dropped(topk_wave, topk_wave.send(rows=ROWS), caplog, 101, "knowledge.relation")
