"""Every reply is checked before anything uses it: one protocol test per malformed-reply case.

Each test sends one wave through a `WireGrid` over an in-memory grid, with the `ReplyGuard` that
`run_strategy` installs and the results `Recorder` as observer (as in a run). Node ``101 + p``
answers honestly as partition ``p`` unless the case tampers with its reply. A bad reply must be
missing from what the wire returns and from what the Recorder saw, be named in exactly one
warning (node and field), and be counted: ``WireStats.dropped`` and the ``replies-dropped`` row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedkd.records import rows_of
from fedkd import reply_checks
from fedkd.models import build_model
from fedkd.reply_guard import ReplyGuard
from fedkd.settings import ClientSettings
from fedkd.simulations.results import Recorder
from fedkd.wire import WireGrid
from tests.conftest import reply, request
from tests.helpers import FakeGrid

NODES = [101, 102, 103, 104]
C = 10  # digits
Q, N = 2, 3  # a query's directions and inputs


def _force(record, key: str, value: object) -> None:
    """Put a value Flower's record would refuse (a str, a bool) into `record`, as a forged
    message could carry it."""
    record.__dict__["_data"][key] = value


def _request(node: int, kind: str, settings: ClientSettings, server_round: int,
             rows: int | None) -> Message:
    config = ConfigRecord({**settings.to_config(), "server-round": server_round})
    content = RecordDict({"config": config})
    if kind in ("train.distill", "train.fd"):
        transfer = ArrayRecord()
        if rows is not None:
            transfer["next.indices"] = Array(np.arange(rows))
        content["transfer"] = transfer
    elif kind == "query":
        config["query-directions"] = Q
        content["query"] = ArrayRecord({"query.inputs": Array(np.zeros((N, 1, 8, 8), np.float32))})
    elif kind == "query.whoami":
        content = RecordDict()
    return request(content, dst=node, server_round=server_round, message_type=kind)


def _weights(settings: ClientSettings, pid: int) -> dict[str, np.ndarray]:
    arch, spec = settings.arch_of(pid)
    with torch.random.fork_rng(devices=[]):  # the fake client must not move the server's RNG
        model = build_model(spec, tuple(settings.data["input_shape"]), C)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def honest(msg: Message, settings: ClientSettings, pid: int) -> Message:
    """What fedkd's ClientApp answers to `msg` as partition `pid` (shapes and sizes exact)."""
    kind = msg.metadata.message_type
    size = settings.data["client_sizes"][pid]
    if kind == "query.whoami":
        TaskIdentity.node_id = msg.metadata.dst_node_id
        try:
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}),
                           reply_to=msg)
        finally:
            TaskIdentity.node_id = 1
    if kind == "evaluate":
        return reply(msg, partition_id=pid, num_examples=settings.data["num_test"],
                     **{"test-accuracy": 0.5, "test-loss": 1.2})
    logits = None
    if kind == "train.distill" and rows_of(msg.content["transfer"], "next") is not None:
        logits = np.zeros((len(rows_of(msg.content["transfer"], "next")), C), np.float32)
    elif kind == "query":
        logits = np.zeros(((1 + Q) * N, C), np.float32)
    out = reply(msg, logits=logits, partition_id=pid, num_examples=size,
                **{"train-loss": 0.3, "test-accuracy": 0.5, "test-loss": 1.2})
    if kind == "train.fd":
        counts = np.zeros(C, np.int64)
        counts[0] = size
        out.content["logits"] = ArrayRecord({"class_logits": Array(np.eye(C, dtype=np.float32)),
                                             "class_counts": Array(counts)})
    elif kind == "train":
        out.content["arrays"] = ArrayRecord({k: Array(v) for k, v in _weights(settings, pid).items()})
        if settings.train.share_class_counts:  # FedDF's class_weighted ensemble
            out.content["logits"] = ArrayRecord({"class_counts": Array(np.full(C, size // C, np.int64))})
    elif kind == "train.distill" and settings.train.share_class_counts and logits is not None:
        out.content["logits"]["class_counts"] = Array(np.full(C, size // C, np.int64))
    return out


class Wave:
    """One wave through the guarded wire; `tamper[node](reply)` spoils that node's reply."""

    def __init__(self, settings: ClientSettings, tmp_path, nodes=NODES) -> None:
        self.settings = settings
        self.pid_of = {n: n - NODES[0] for n in nodes}
        self.tamper: dict[int, Callable[[Message], None]] = {}
        self.errors: set[int] = set()  # nodes whose handler fails (an error reply)
        self.fake = FakeGrid(list(nodes), answer=self._answer)
        self.wire = WireGrid(self.fake, poll_interval=0.0,
                             check=ReplyGuard(settings, connected=self.fake.get_node_ids))
        self.recorder = Recorder(tmp_path, list(settings.assignment), {
            "strategy": "fedmd", "dataset": "digits", "partition": "dirichlet",
            "num_clients": len(settings.assignment), "num_rounds": 3, "seed": 0})
        self.wire.observers.append(self.recorder.on_replies)
        self.seen: list[Message] = []
        self.wire.observers.append(lambda rnd, replies, stats: self.seen.extend(replies))

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node in self.errors:
            return reply(msg, error="boom")
        out = honest(msg, self.settings, self.pid_of[node])
        if node in self.tamper:
            self.tamper[node](out)
        return out

    def send(self, kind: str = "train.distill", server_round: int = 1, nodes=None,
             rows: int | None = 5) -> list[Message]:
        nodes = nodes or sorted(self.pid_of)
        self.seen = []
        msgs = [_request(n, kind, self.settings, server_round, rows) for n in nodes]
        return list(self.wire.send_and_receive(msgs, timeout=5))

    def dropped_rows(self, server_round: int) -> float:
        frame = self.recorder.frame()
        return frame[(frame["round"] == server_round)
                     & (frame.metric == "replies-dropped")].value.sum()


@pytest.fixture
def wave(flower_ids, small_run, tmp_path) -> Wave:
    return Wave(small_run.settings, tmp_path)


def assert_dropped(wave: Wave, replies: list[Message], caplog, node: int, field: str,
                   server_round: int = 1, kept: int = 3) -> None:
    """`node`'s reply was dropped, once, by name and field; the others went through."""
    assert node not in [r.metadata.src_node_id for r in replies]
    assert node not in [r.metadata.src_node_id for r in wave.seen]  # the Recorder never saw it
    assert len(replies) == kept
    assert wave.wire.waves[-1].dropped == 1 and wave.wire.waves[-1].replied == kept + 1
    assert wave.dropped_rows(server_round) == 1
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "dropped" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"round {server_round}: reply from node {node} dropped: {field}"), \
        warnings[0]


def _metric(key: str, value: object) -> Callable[[Message], None]:
    return lambda r: _force(r.content["metrics"], key, value)


# --- partition-id ----------------------------------------------------------------------------
PARTITION_IDS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "list": [1, 2],
                 "string": "1", "bool": True, "float": 1.0, "negative": -1, "out of range": 1000,
                 "huge": 10**30}


@pytest.mark.parametrize("case", list(PARTITION_IDS))
def test_bad_partition_id_is_dropped(wave, caplog, case):
    wave.tamper[102] = _metric("partition-id", PARTITION_IDS[case])
    replies = wave.send()
    assert_dropped(wave, replies, caplog, 102, "metrics.partition-id=")
    assert "is not an int in 0..3" in caplog.text
    assert [r.content["metrics"]["partition-id"] for r in replies] == [0, 2, 3]


def test_missing_partition_id_is_dropped(wave, caplog):
    wave.tamper[103] = lambda r: r.content["metrics"].__delitem__("partition-id")
    assert_dropped(wave, wave.send(), caplog, 103, "metrics.partition-id=None is not an int")


def test_out_of_range_partition_id_leaves_a_summary(wave, caplog, tmp_path):
    """The claim that once let every round finish and then broke `Recorder.finish`."""
    wave.tamper[104] = _metric("partition-id", 1000)
    for rnd in (1, 2):
        assert_dropped(wave, wave.send(server_round=rnd), caplog, 104, "metrics.partition-id=1000",
                       server_round=rnd)
        caplog.clear()
    summary = wave.recorder.finish()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert sorted(summary["final_accuracy_by_client"]) == ["0", "1", "2", "3"]
    assert summary["final_accuracy_by_client"]["3"] is None  # partition 3 never answered validly
    assert summary["status"] == "degraded" and summary["replies_dropped"] == 2


def test_duplicate_partition_in_one_wave_drops_the_second(wave, caplog):
    wave.tamper[103] = _metric("partition-id", 0)  # node 101 answered partition 0 first
    assert_dropped(wave, wave.send(), caplog, 103, "metrics.partition-id=0 already answered")


def test_node_claiming_another_nodes_partition_is_dropped(flower_ids, small_run, tmp_path, caplog):
    wave = Wave(small_run.settings, tmp_path, nodes=[*NODES, 105])
    wave.send(nodes=NODES)  # round 1 binds node 101 + p to partition p
    wave.pid_of[105] = 0  # a node that joins later claims partition 0, held by node 101
    replies = wave.send(server_round=2, nodes=[102, 105])
    assert_dropped(wave, replies, caplog, 105, "metrics.partition-id=0 is held by node 101",
                   server_round=2, kept=1)


def test_node_switching_partition_is_dropped(wave, caplog):
    wave.send()
    wave.tamper[102] = _metric("partition-id", 3)  # node 102 held 1; 3's holder is not asked
    replies = wave.send(server_round=2, nodes=[101, 102, 103])
    assert_dropped(wave, replies, caplog, 102, "metrics.partition-id=3 is not node 102's "
                   "partition 1", server_round=2, kept=2)


def test_partition_of_a_node_that_left_may_be_claimed(flower_ids, small_run, tmp_path, caplog):
    wave = Wave(small_run.settings, tmp_path, nodes=[*NODES, 105])
    wave.send(nodes=NODES)
    wave.fake.nodes.remove(101)  # node 101 is gone (a restart comes back under a new id)
    wave.pid_of[105] = 0
    replies = wave.send(server_round=2, nodes=[102, 105])
    assert len(replies) == 2 and wave.wire.waves[-1].dropped == 0


# --- num-examples ----------------------------------------------------------------------------
EXAMPLES = {"negative": -1, "nan": math.nan, "inf": math.inf, "huge float": 1e30,
            "huge int": 10**12, "float": 10.0, "bool": True, "list": [3]}


@pytest.mark.parametrize("case", [*EXAMPLES, "one over the partition", "missing"])
def test_bad_num_examples_is_dropped(wave, small_run, caplog, case):
    size = small_run.settings.data["client_sizes"][1]
    if case == "missing":
        wave.tamper[102] = lambda r: r.content["metrics"].__delitem__("num-examples")
        field = "metrics.num-examples is missing"
    else:
        wave.tamper[102] = _metric("num-examples", EXAMPLES.get(case, size + 1))
        field = "metrics.num-examples="
    assert_dropped(wave, wave.send(), caplog, 102, field)
    if case != "missing":
        assert f"is not an int in 0..{size}" in caplog.text  # capped at what partition 1 holds


def test_evaluation_count_is_capped_at_the_test_set(wave, small_run, caplog):
    num_test = small_run.settings.data["num_test"]
    wave.tamper[101] = _metric("num-examples", num_test + 1)
    assert_dropped(wave, wave.send("evaluate"), caplog, 101,
                   f"metrics.num-examples={num_test + 1} is not an int in 0..{num_test}")


# --- other metrics ---------------------------------------------------------------------------
METRICS = {"nan loss": ("train-loss", math.nan), "inf loss": ("test-loss", math.inf),
           "negative loss": ("train-loss", -1.0), "accuracy above 1": ("test-accuracy", 1.5),
           "negative accuracy": ("test-accuracy-own", -0.1), "list accuracy": ("test-accuracy", [1]),
           "negative seconds": ("time-digest-s", -2.0), "unknown key": ("secret", 1.0)}


@pytest.mark.parametrize("case", list(METRICS))
def test_bad_metric_is_dropped(wave, caplog, case):
    key, value = METRICS[case]
    wave.tamper[104] = _metric(key, value)
    assert_dropped(wave, wave.send(), caplog, 104, f"metrics.{key}")


# --- logits ----------------------------------------------------------------------------------
LOGITS = {"nan": np.full((5, C), np.nan, np.float32), "inf": np.full((5, C), np.inf, np.float32),
          "-inf": np.full((5, C), -np.inf, np.float32),
          "huge": np.full((5, C), 2 * reply_checks.MAX_ABS_LOGIT, np.float32),
          "too few rows": np.zeros((4, C), np.float32), "too many classes": np.zeros((5, C + 1), np.float32),
          "int dtype": np.zeros((5, C), np.int64), "complex dtype": np.zeros((5, C), np.complex64),
          "bool dtype": np.zeros((5, C), bool)}


@pytest.mark.parametrize("case", list(LOGITS))
def test_bad_logits_are_dropped(wave, caplog, case):
    wave.tamper[102] = lambda r: r.content["logits"].__setitem__("logits", Array(LOGITS[case]))
    assert_dropped(wave, wave.send(), caplog, 102, "logits.logits")


def test_logits_at_the_bound_pass(wave):
    edge = np.full((5, C), -reply_checks.MAX_ABS_LOGIT, np.float32)
    wave.tamper[102] = lambda r: r.content["logits"].__setitem__("logits", Array(edge))
    assert len(wave.send()) == 4 and wave.wire.waves[-1].dropped == 0


def test_missing_logits_are_dropped(wave, caplog):
    wave.tamper[101] = lambda r: r.content.__delitem__("logits")
    assert_dropped(wave, wave.send(), caplog, 101, "logits.logits is missing")


def test_logits_nobody_asked_for_are_dropped(wave, caplog):
    wave.tamper[101] = lambda r: r.content.__setitem__(
        "logits", ArrayRecord({"logits": Array(np.zeros((5, C), np.float32))}))
    assert_dropped(wave, wave.send(rows=None), caplog, 101, "logits were not asked for")


def test_query_logits_must_have_the_expanded_rows(wave, caplog):
    wave.tamper[103] = lambda r: r.content["logits"].__setitem__(
        "logits", Array(np.zeros((N, C), np.float32)))  # the inputs only, no perturbations
    assert_dropped(wave, wave.send("query"), caplog, 103,
                   f"logits.logits has shape ({N}, {C}), expected ({(1 + Q) * N}, {C})")


# --- class counts (FD, and FedMD-style with share_class_counts) ------------------------------
COUNTS = {"negative": np.r_[-1, np.zeros(C - 1)].astype(np.int64),
          "fractional": np.full(C, 0.5), "nan": np.full(C, np.nan), "bool": np.ones(C, bool),
          "wrong shape": np.zeros(C - 1, np.int64), "more than the partition": np.full(C, 10**6),
          "huge": np.full(C, 1e30)}


@pytest.mark.parametrize("case", list(COUNTS))
def test_bad_fd_class_counts_are_dropped(wave, caplog, case):
    wave.tamper[102] = lambda r: r.content["logits"].__setitem__("class_counts", Array(COUNTS[case]))
    assert_dropped(wave, wave.send("train.fd"), caplog, 102, "logits.class_counts")


@pytest.mark.parametrize("case", ["nan", "huge", "wrong shape"])
def test_bad_fd_class_logits_are_dropped(wave, caplog, case):
    bad = {"nan": np.full((C, C), np.nan, np.float32), "huge": np.full((C, C), 1e6, np.float32),
           "wrong shape": np.zeros((C, C - 1), np.float32)}[case]
    wave.tamper[102] = lambda r: r.content["logits"].__setitem__("class_logits", Array(bad))
    assert_dropped(wave, wave.send("train.fd"), caplog, 102, "logits.class_logits")


@pytest.mark.parametrize("case", ["more than the partition", "negative", "missing"])
def test_bad_shared_class_counts_are_dropped(flower_ids, small_run, tmp_path, caplog, case):
    train = dataclasses.replace(small_run.settings.train, share_class_counts=True)
    wave = Wave(dataclasses.replace(small_run.settings, train=train), tmp_path)
    if case == "missing":
        wave.tamper[104] = lambda r: r.content["logits"].__delitem__("class_counts")
    else:
        wave.tamper[104] = lambda r: r.content["logits"].__setitem__(
            "class_counts", Array(COUNTS[case]))
    assert_dropped(wave, wave.send(), caplog, 104, "logits.class_counts")


@pytest.mark.parametrize("case", [None, "more than the partition", "missing", "not shared"])
def test_class_counts_with_weights_pass_only_when_the_run_shares_them(flower_ids, small_run,
                                                                      tmp_path, caplog, case):
    shared = case != "not shared"
    train = dataclasses.replace(small_run.settings.train, share_class_counts=shared)
    wave = Wave(dataclasses.replace(small_run.settings, train=train), tmp_path)
    if case == "missing":
        wave.tamper[104] = lambda r: r.content.__delitem__("logits")
    elif case == "more than the partition":
        wave.tamper[104] = lambda r: r.content["logits"].__setitem__(
            "class_counts", Array(COUNTS[case]))
    elif case == "not shared":  # counts nobody asked for
        wave.tamper[104] = lambda r: r.content.__setitem__("logits", ArrayRecord(
            {"class_counts": Array(np.ones(C, np.int64))}))
    replies = wave.send("train")
    if case is None:
        assert len(replies) == 4 and wave.wire.waves[-1].dropped == 0
    else:
        assert_dropped(wave, replies, caplog, 104, "logits")


# --- weights (FedDF, FedAvg) -----------------------------------------------------------------
@pytest.mark.parametrize("case", ["nan", "inf", "wrong shape", "missing key", "extra key",
                                  "int for float", "other architecture", "no arrays"])
def test_bad_weights_are_dropped(wave, small_run, caplog, case):
    def spoil(r: Message) -> None:
        if case == "no arrays":
            del r.content["arrays"]
            return
        state = _weights(small_run.settings, 0 if case == "other architecture" else 1)
        first = next(iter(state))
        if case in ("nan", "inf"):
            state[first] = np.full_like(state[first], np.nan if case == "nan" else np.inf)
        elif case == "wrong shape":
            state[first] = state[first][:1]
        elif case == "missing key":
            del state[first]
        elif case == "extra key":
            state["backdoor"] = np.zeros(1, np.float32)
        elif case == "int for float":
            state[first] = state[first].astype(np.int64)
        r.content["arrays"] = ArrayRecord({k: Array(v) for k, v in state.items()})

    wave.tamper[102] = spoil  # partition 1 runs the mlp
    assert_dropped(wave, wave.send("train"), caplog, 102, "arrays")


def test_weight_check_leaves_torch_s_random_state_alone(wave):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    wave.send("train")
    assert torch.equal(torch.rand(3), expected)


# --- records, node, whoami -------------------------------------------------------------------
RECORD_CASES = {
    "unknown record": (lambda r: r.content.__setitem__("extra", ConfigRecord({"a": 1})),
                       "extra is not a record"),
    "no metrics": (lambda r: r.content.__delitem__("metrics"), "metrics is missing"),
    "metrics of another type": (lambda r: r.content.__setitem__(
        "metrics", ConfigRecord({"partition-id": 1})), "metrics is a ConfigRecord"),
    "node arch unknown": (lambda r: r.content.__setitem__(
        "node", ConfigRecord({"arch": "resnet", "role": "student"})), "node.arch='resnet'"),
    "node role unknown": (lambda r: r.content.__setitem__(
        "node", ConfigRecord({"arch": "mlp", "role": "king"})), "node.role='king'"),
    "node extra key": (lambda r: r.content.__setitem__(
        "node", ConfigRecord({"arch": "mlp", "cmd": "x"})), "node.cmd is not a key"),
    "another sender": (lambda r: r.metadata.__dict__.__setitem__("_src_node_id", 999),
                       "metadata.src_node_id=999 is not the node asked (102)"),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_bad_records_are_dropped(wave, caplog, case):
    spoil, field = RECORD_CASES[case]
    wave.tamper[102] = spoil
    replies = wave.send()
    node = 999 if case == "another sender" else 102
    assert_dropped(wave, replies, caplog, node, field)


def test_a_deployed_node_s_report_passes(wave):
    def report(r: Message) -> None:
        r.content["node"] = ConfigRecord({"arch": "mlp", "role": "teacher"})
        r.content["metrics"]["compute-s"] = 0.25

    wave.tamper[102] = report
    assert len(wave.send()) == 4 and wave.wire.waves[-1].dropped == 0


@pytest.mark.parametrize("case", ["nan", "extra metric"])
def test_bad_whoami_answer_is_dropped(wave, caplog, case):
    wave.tamper[101] = (_metric("partition-id", math.nan) if case == "nan"
                        else _metric("num-examples", 5))
    field = "metrics.partition-id=nan" if case == "nan" else "metrics.num-examples is not part"
    assert_dropped(wave, wave.send("query.whoami"), caplog, 101, field)


# --- what stays as it was --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["train.distill", "train.fd", "query", "query.whoami", "train",
                                  "evaluate"])
def test_honest_replies_of_every_type_pass_in_partition_order(wave, kind):
    wave.fake.nodes.reverse()
    replies = wave.send(kind, nodes=list(reversed(NODES)))
    assert [r.content["metrics"]["partition-id"] for r in replies] == [0, 1, 2, 3]
    assert wave.wire.waves[-1].dropped == 0 and wave.dropped_rows(1) == 0


def test_error_replies_are_returned_and_counted_as_errors_not_drops(wave, caplog):
    wave.errors.add(103)
    replies = wave.send()
    assert len(replies) == 4 and sum(r.has_error() for r in replies) == 1
    assert wave.wire.waves[-1].errors == 1 and wave.wire.waves[-1].dropped == 0
    assert "dropped" not in caplog.text
