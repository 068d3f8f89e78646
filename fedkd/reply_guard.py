"""The server's one check of every reply, before the wire sorts it, observers see it or a
strategy reads it.

`ReplyGuard` is bound to the run settings (`fedkd.server.run_strategy` gives it to the
`fedkd.wire.WireGrid`); the wire calls it once per reply that is not an error, with the request
the reply answers. It raises `fedkd.reply_checks.ReplyError` naming the first bad field; the wire
then drops the reply with one warning and counts it (`WireStats.dropped`). It checks

- the records: only those the message type allows (``metrics`` always; ``logits``, ``arrays``,
  ``node`` where the type has them), each of its record type, and the reply comes from the node
  that was asked;
- ``metrics``: only keys fedkd reads; ``partition-id`` an int in ``0..num_partitions - 1``;
  ``num-examples`` an int in ``0..`` what the partition holds (`reply_checks.example_cap`);
  losses, accuracies and seconds finite and in their ranges (`reply_checks.METRIC_RANGES`);
- who holds which partition: a node is bound to the first partition it validly claims; a node
  claiming another partition later, or a partition another connected node holds, is dropped, and
  a partition answers at most once per wave;
- ``logits``: the rows the request asked (``next.*``; a query's ``(1 + Q) * N``) times the
  classes, finite, ``|x| <= MAX_ABS_LOGIT``; ``class_counts`` (FD; FedMD-style strategies when
  ``train.share_class_counts``) whole, >= 0, summing to at most the partition's size;
- ``arrays`` (weights): the keys and shapes of the partition's architecture, finite;
- ``node`` (deployed nodes): ``arch`` one of the run's architectures, ``role`` student or teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedkd import reply_checks as check
from fedkd.models import build_model
from fedkd.models.assign import ROLES
from fedkd.protocol import (
    ARRAYS, CLASS_COUNTS, CLASS_LOGITS, EVALUATE, FD_MESSAGE_TYPE, KNOWLEDGE, LOGITS, MESSAGE_TYPE,
    PROTOTYPE_COUNTS, PROTOTYPES, RELATION, RELATION_INDEX,
    METRICS, NODE, NODE_ARCH, NODE_ROLE, NUM_EXAMPLES, PARTITION_ID, QUERY, TRAIN, WHOAMI,
)
from fedkd.records import asked_rows, relation_topk
from fedkd.reply_checks import ReplyError
from fedkd.settings import ClientSettings
from fedkd.strategies.checkpointed import Nodes

RECORDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    MESSAGE_TYPE: (frozenset({METRICS}), frozenset({LOGITS, KNOWLEDGE, NODE})),
    FD_MESSAGE_TYPE: (frozenset({METRICS, LOGITS}), frozenset({NODE})),
    QUERY: (frozenset({METRICS, LOGITS}), frozenset({NODE})),
    WHOAMI: (frozenset({METRICS}), frozenset()),
    TRAIN: (frozenset({METRICS, ARRAYS}), frozenset({LOGITS, NODE})),  # logits: FedDF's class counts
    EVALUATE: (frozenset({METRICS}), frozenset({NODE})),
}
"""Message type -> (records every reply carries, records it may carry)."""
RECORD_TYPES = {METRICS: MetricRecord, LOGITS: ArrayRecord, ARRAYS: ArrayRecord, NODE: ConfigRecord,
                KNOWLEDGE: ArrayRecord}


class ReplyGuard:
    """Checks each reply of a run against its request and the run settings.

    Parameters
    ----------
    settings : ClientSettings
        The run: number of partitions (``len(assignment)``), classes, data sizes, architectures.
    connected : callable or None
        The node ids connected now; a partition held by a node that is gone may be claimed by
        another (a restarted node comes back under a new id). None: holders never leave.
    """

    def __init__(self, settings: ClientSettings,
                 connected: Callable[[], Iterable[int]] | None = None) -> None:
        self.settings = settings
        self.num_partitions = len(settings.assignment)
        self.num_classes = int(settings.data["num_classes"])
        self.partition_of: dict[int, int] = {}  # node id -> the partition it holds
        self.holder: dict[int, int] = {}  # partition id -> node id
        self._connected = connected
        self._shapes: dict[str, dict[str, tuple[tuple[int, ...], bool]]] = {}

    def __call__(self, reply: Message, request: Message, wave: set[int]) -> None:
        """Check `reply` (not an error) to `request`; `wave` holds the partitions that already
        answered this wave. Raises `ReplyError` naming the field; on success the reply's
        partition joins `wave` and its node is bound to it."""
        node, asked = reply.metadata.src_node_id, request.metadata.dst_node_id
        if node != asked:
            raise ReplyError(f"metadata.src_node_id={node} is not the node asked ({asked})")
        kind = request.metadata.message_type
        records = self._records(reply, kind)
        metrics = records[METRICS]
        pid = self._partition(node, metrics.get(PARTITION_ID), wave)
        self._metrics(metrics, pid, kind)
        counted = kind == TRAIN and self.settings.train.share_class_counts
        if LOGITS in records or counted or kind == MESSAGE_TYPE and asked_rows(request) is not None:
            self._logits(records.get(LOGITS), request, pid, kind)
        if kind == MESSAGE_TYPE and (KNOWLEDGE in records or self._knowledge_asked(request)):
            self._knowledge(records.get(KNOWLEDGE), request, pid)
        if ARRAYS in records:
            arch, _ = self.settings.arch_of(pid)
            check.weights({k: records[ARRAYS][k].numpy() for k in records[ARRAYS]},
                          self._reference(arch), ARRAYS)
        if NODE in records:
            self._node(records[NODE])
        wave.add(pid)
        self.partition_of[node], self.holder[pid] = pid, node

    def state_dict(self, nodes: Nodes) -> dict[str, Any]:
        """Which partition each node is bound to, keyed by the partition the engine gave the
        node (a checkpoint's: node ids differ from run to run)."""
        return {"partition_of": nodes.to_partitions(self.partition_of)}

    def load_state_dict(self, state: dict[str, Any], nodes: Nodes) -> None:
        """Inverse of `state_dict`, onto this run's nodes."""
        self.partition_of = nodes.to_nodes(state["partition_of"])
        self.holder = {pid: node for node, pid in self.partition_of.items()}

    # --- the parts ----------------------------------------------------------------------------
    def _records(self, reply: Message, kind: str) -> dict[str, object]:
        if kind not in RECORDS:
            raise ReplyError(f"message type {kind!r} has no reply checks (fedkd.reply_guard)")
        required, optional = RECORDS[kind]
        content = reply.content
        names = set(content.keys())
        if missing := sorted(required - names):
            raise ReplyError(f"{missing[0]} is missing")
        if extra := sorted(names - required - optional):
            raise ReplyError(f"{extra[0]} is not a record a {kind} reply carries")
        for name in names:
            if not isinstance(content[name], RECORD_TYPES[name]):
                raise ReplyError(f"{name} is a {type(content[name]).__name__}, expected a "
                                 f"{RECORD_TYPES[name].__name__}")
        return {name: content[name] for name in names}

    def _partition(self, node: int, value: object, wave: set[int]) -> int:
        pid = check.partition_id(value, self.num_partitions)
        field = f"{METRICS}.{PARTITION_ID}={pid}"
        if pid in wave:
            raise ReplyError(f"{field} already answered in this wave")
        own = self.partition_of.get(node)
        if own is not None and own != pid:
            raise ReplyError(f"{field} is not node {node}'s partition {own}")
        holder = self.holder.get(pid)
        if holder not in (None, node):
            if self._connected is None or holder in set(self._connected()):
                raise ReplyError(f"{field} is held by node {holder}")
            del self.partition_of[holder]  # the holder is gone: the partition is free again
        return pid

    def _metrics(self, metrics: MetricRecord, pid: int, kind: str) -> None:
        if kind == WHOAMI:
            if extra := sorted(set(metrics.keys()) - {PARTITION_ID}):
                raise ReplyError(f"{METRICS}.{extra[0]} is not part of a {WHOAMI} answer")
            return
        if NUM_EXAMPLES not in metrics:
            raise ReplyError(f"{METRICS}.{NUM_EXAMPLES} is missing")
        cap = check.example_cap(self.settings.data, pid, evaluation=kind == EVALUATE)
        check.count(metrics[NUM_EXAMPLES], cap)
        for key, value in metrics.items():
            if key not in (PARTITION_ID, NUM_EXAMPLES):
                check.metric(key, value)

    def _logits(self, record: ArrayRecord | None, request: Message, pid: int, kind: str) -> None:
        c = self.num_classes
        if kind == FD_MESSAGE_TYPE:
            shapes = {CLASS_LOGITS: (c, c), CLASS_COUNTS: (c,)}
        elif kind == TRAIN:  # weights, plus the class counts when the run shares them (FedDF)
            if not self.settings.train.share_class_counts:
                raise ReplyError(f"{LOGITS} were not asked for")
            shapes = {CLASS_COUNTS: (c,)}
        else:
            rows = asked_rows(request)
            if rows is None:
                raise ReplyError(f"{LOGITS} were not asked for")
            shapes = {LOGITS: (rows, c)}
            if kind == MESSAGE_TYPE and self.settings.train.share_class_counts:
                shapes[CLASS_COUNTS] = (c,)
        self._arrays(record, LOGITS, shapes, pid, f"is not an array a {kind} reply carries")

    def _knowledge_asked(self, request: Message) -> dict[str, tuple[int, ...]]:
        """The ``knowledge`` arrays `request` asks for, and their shapes."""
        train, c = self.settings.train, self.num_classes
        shapes: dict[str, tuple[int, ...]] = {}
        rows = asked_rows(request)
        if train.relation_rows and rows is not None:
            r = min(rows, train.relation_rows)
            shapes[RELATION] = (r, max(r - 1, 0))
            if k := relation_topk(r, train.relation_topk):  # each row's k largest, their columns
                shapes[RELATION] = shapes[RELATION_INDEX] = (r, k)
        if train.prototype_dim:
            shapes[PROTOTYPES], shapes[PROTOTYPE_COUNTS] = (c, train.prototype_dim), (c,)
        return shapes

    def _knowledge(self, record: ArrayRecord | None, request: Message, pid: int) -> None:
        self._arrays(record, KNOWLEDGE, self._knowledge_asked(request), pid, "was not asked for")

    def _arrays(self, record: ArrayRecord | None, name: str, shapes: dict[str, tuple[int, ...]],
                pid: int, unasked: str) -> None:
        """`record` (`name`) holds exactly the arrays `shapes` lists, each valid: counts per class
        within the partition `pid`, cosine similarities, or finite bounded values."""
        record = record if record is not None else ArrayRecord()
        if missing := sorted(set(shapes) - set(record.keys())):
            raise ReplyError(f"{name}.{missing[0]} is missing")
        if extra := sorted(set(record.keys()) - set(shapes)):
            raise ReplyError(f"{name}.{extra[0]} {unasked}")
        for key, shape in shapes.items():
            field, array = f"{name}.{key}", record[key].numpy()
            if key in (CLASS_COUNTS, PROTOTYPE_COUNTS):
                check.class_counts(array, self.num_classes,
                                   check.example_cap(self.settings.data, pid), field)
            elif key == RELATION:
                check.relation(array, shape[0], field, width=shape[1])
            elif key == RELATION_INDEX:
                check.relation_index(array, shape, field)
            else:
                check.logits(array, shape, field)

    def _node(self, record: ConfigRecord) -> None:
        if extra := sorted(set(record.keys()) - {NODE_ARCH, NODE_ROLE}):
            raise ReplyError(f"{NODE}.{extra[0]} is not a key a node reports")
        arch, role = record.get(NODE_ARCH), record.get(NODE_ROLE)
        if arch is not None and (not isinstance(arch, str) or arch not in self.settings.archs):
            raise ReplyError(f"{NODE}.{NODE_ARCH}={check.show(arch)} is not one of "
                             f"{sorted(self.settings.archs)}")
        if role is not None and role not in ROLES:
            raise ReplyError(f"{NODE}.{NODE_ROLE}={check.show(role)} is not one of {list(ROLES)}")

    def _reference(self, arch: str) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Keys, shapes and kinds of an architecture's state dict (built once, RNG untouched)."""
        if arch not in self._shapes:
            data = self.settings.data
            with torch.random.fork_rng(devices=[]):
                model = build_model(self.settings.archs[arch], tuple(data["input_shape"]),
                                    int(data["num_classes"]))
            self._shapes[arch] = {k: (tuple(v.shape), v.is_floating_point())
                                  for k, v in model.state_dict().items()}
        return self._shapes[arch]
