"""WireGrid: timeouts, stragglers, byte counts, deterministic reply order."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedkd.wire import WireGrid, content_bytes, reply_order
from tests.conftest import reply, request
from tests.helpers import FakeGrid


def _wave(nodes, server_round=1):
    content = RecordDict({"config": ConfigRecord({"k": "v"})})
    return [request(content, dst=n, server_round=server_round) for n in nodes]


def test_all_replies_sorted_by_partition_id(flower_ids):
    fake = FakeGrid([3, 1, 2])
    wire = WireGrid(fake, poll_interval=0.001)
    replies = wire.send_and_receive(_wave([3, 1, 2]), timeout=1)
    assert [r.content["metrics"]["partition-id"] for r in replies] == [1, 2, 3]
    assert wire.waves[0].replied == 3 and wire.waves[0].timed_out == 0


def test_timeout_returns_partial_results_and_skips_straggler_until_it_answers(flower_ids):
    fake = FakeGrid([1, 2, 3])
    fake.silent = {2}
    wire = WireGrid(fake, poll_interval=0.001)
    first = wire.send_and_receive(_wave([1, 2, 3]), timeout=0.05)
    assert sorted(r.metadata.src_node_id for r in first) == [1, 3]
    assert wire.busy_node_ids() == {2}

    second = wire.send_and_receive(_wave([1, 2, 3], server_round=2), timeout=0.05)
    assert sorted(r.metadata.src_node_id for r in second) == [1, 3]
    assert wire.waves[1].skipped_busy == 1
    assert [m.metadata.dst_node_id for m in fake.pushed[3:]] == [1, 3]  # node 2 got nothing new

    fake.silent = set()  # the straggler's late reply arrives: discarded, node free again
    assert wire.busy_node_ids() == set()
    third = wire.send_and_receive(_wave([1, 2, 3], server_round=3), timeout=1)
    assert [r.metadata.src_node_id for r in third] == [1, 2, 3]
    assert all(r.metadata.reply_to_message_id in {m.metadata.message_id for m in fake.pushed[5:]}
               for r in third)


@pytest.mark.parametrize("timeout", [None, 0, -1])
def test_refuses_to_wait_forever(flower_ids, timeout):
    with pytest.raises(ValueError, match="timeout"):
        WireGrid(FakeGrid([1])).send_and_receive(_wave([1]), timeout=timeout)


def test_counts_bytes_both_ways_and_tells_observers(flower_ids):
    logits = np.zeros((5, 3), dtype=np.float32)
    fake = FakeGrid([1, 2], answer=lambda m: reply(m, logits=logits, partition_id=0))
    wire = WireGrid(fake, poll_interval=0.001)
    seen = []
    wire.observers.append(lambda rnd, replies, stats: seen.append((rnd, len(replies), stats)))
    down = RecordDict({"transfer": ArrayRecord({"x": Array(np.zeros(7, dtype=np.int64))})})
    wave = [request(down, dst=n, server_round=4) for n in (1, 2)]
    wire.send_and_receive(wave, timeout=1)
    stats = seen[0][2]
    assert seen[0][:2] == (4, 2)
    assert stats.bytes_down == 2 * content_bytes(down)
    # 60 bytes of float32 logits (+ key and numpy header) and two 8-byte metrics (+ keys) each
    per_reply = content_bytes(reply(wave[0], logits=logits, partition_id=0).content)
    assert stats.bytes_up == 2 * per_reply > 2 * 60


def test_error_replies_are_counted_not_fatal(flower_ids):
    fake = FakeGrid([1, 2], answer=lambda m: reply(m, error="boom") if m.metadata.dst_node_id == 2
                    else reply(m, partition_id=0))
    wire = WireGrid(fake, poll_interval=0.001)
    replies = wire.send_and_receive(_wave([1, 2]), timeout=1)
    assert len(replies) == 2 and wire.waves[0].errors == 1


def test_round_falls_back_to_config_server_round(flower_ids):
    fake = FakeGrid([1])
    wire = WireGrid(fake, poll_interval=0.001)
    msg = request(RecordDict({"config": ConfigRecord({"server-round": 7})}), dst=1)
    msg.metadata.group_id = ""
    wire.send_and_receive([msg], timeout=1)
    assert wire.waves[0].server_round == 7


def test_metric_record_only_reply_has_small_size(flower_ids):
    fake = FakeGrid([1])
    wire = WireGrid(fake, poll_interval=0.001)
    wire.send_and_receive(_wave([1]), timeout=1)
    assert wire.waves[0].bytes_up == MetricRecord(
        {"num-examples": 10, "partition-id": 1}).count_bytes()


def test_reply_order_puts_malformed_partition_ids_last_instead_of_failing(flower_ids):
    """Without a check (tests of the wire alone) a NaN or list id must not break the sort."""
    wave = _wave([1, 2, 3, 4])
    claims = {1: float("nan"), 2: 1, 3: [0, 1], 4: 0}
    replies = sorted((reply(m, partition_id=claims[m.metadata.dst_node_id]) for m in wave),
                     key=reply_order)
    assert [r.metadata.src_node_id for r in replies] == [4, 2, 1, 3]


def test_polling_backs_off_while_nothing_arrives_and_resets_when_replies_do(flower_ids, monkeypatch):
    fake = FakeGrid([1, 2, 3])
    fake.silent = {1, 2, 3}
    waits, pulls = [], []
    script = {3: {1}, 4: {2}, 9: {3}}  # after the k-th pull these nodes answer

    def sleep(seconds):
        waits.append(round(seconds, 6))
        fake.silent -= script.get(len(waits), set())

    real_pull = fake.pull_messages
    monkeypatch.setattr(fake, "pull_messages", lambda ids: pulls.append(1) or real_pull(ids))
    monkeypatch.setattr("fedkd.wire.time.sleep", sleep)
    wire = WireGrid(fake, poll_interval=0.02)
    replies = wire.send_and_receive(_wave([1, 2, 3]), timeout=60)
    assert len(replies) == 3
    # 0.02 doubling to the cap 0.1 (5 x) while nothing came; back to 0.02 after each arrival
    assert waits == [0.04, 0.08, 0.1, 0.02, 0.02, 0.04, 0.08, 0.1, 0.1]
    assert len(pulls) == len(waits) + 1
