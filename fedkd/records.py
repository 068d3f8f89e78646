"""The protocol's Flower records: build the transfer record, read rows and logits back.

Key names live in `fedkd.protocol`; this module only turns them into (and out of) `flwr.app`
records, so both the server strategies and the ClientApp use one codec. `record_dict_state` and
`record_dict_from_state` turn records into plain values (str, int, float, bool, bytes, lists,
dicts) and back, bit for bit: what a run's checkpoint keeps of them (`torch.save`, read back with
``weights_only=True``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedkd.protocol import (
    CLASS_COUNTS, CONFIG, KNOWLEDGE, LOGITS, NEXT, PROTOTYPE_COUNTS, PROTOTYPES, QUERY,
    QUERY_DIRECTIONS, RELATION, RELATION_INDEX, ROW_KINDS, TARGETS, TRANSFER,
    array_digest, decode_rows, encode_rows, row_count, rows_to_inputs,
)
from fedkd import reply_checks
from fedkd.reply_checks import MAX_EXAMPLES, ReplyError


def transfer_record(
    soft_targets: np.ndarray | None = None,
    target_rows: np.ndarray | None = None,
    next_rows: np.ndarray | None = None,
) -> ArrayRecord:
    """Build the ``transfer`` record; rows of integers are public rows (a mask or indices,
    `fedkd.protocol.encode_rows`), others inputs."""
    record = ArrayRecord()
    if soft_targets is not None:
        if target_rows is None:
            raise ValueError("soft targets need the rows they belong to")
        record[f"{TARGETS}.probs"] = Array(np.asarray(soft_targets, dtype=np.float32))
        kind, array = encode_rows(target_rows)
        record[f"{TARGETS}.{kind}"] = Array(array)
    if next_rows is not None:
        kind, array = encode_rows(next_rows)
        record[f"{NEXT}.{kind}"] = Array(array)
    return record


def rows_digest(key: str, array: Array) -> str:
    """The digest of a ``<prefix>.<kind>`` rows array (the prefix does not count)."""
    kind = key.rsplit(".", 1)[1]
    return array_digest(kind, array.dtype, tuple(array.shape), array.data)


def rows_key_in(record: ArrayRecord, prefix: str) -> str | None:
    """The key of `record`'s ``<prefix>.<kind>`` rows array, None when it has none."""
    for kind in ROW_KINDS:
        if f"{prefix}.{kind}" in record:
            return f"{prefix}.{kind}"
    return None


def rows_of(record: ArrayRecord, prefix: str) -> np.ndarray | None:
    """The rows ``<prefix>.<kind>`` names, decoded: int64 indices or float inputs."""
    key = rows_key_in(record, prefix)
    if key is None:
        return None
    return decode_rows(key.rsplit(".", 1)[1], record[key].numpy(), prefix)


def rows_from(record: ArrayRecord, prefix: str, public_x: torch.Tensor) -> torch.Tensor | None:
    """Inputs named by ``<prefix>.<kind>``: rows of `public_x` (mask, indices) or inputs."""
    rows = rows_of(record, prefix)
    return None if rows is None else rows_to_inputs(rows, public_x, prefix)


def asked_rows(request: Message) -> int | None:
    """Rows of logits `request` asks for: its ``next.*`` rows (``train.distill``), or a query's
    ``(1 + Q) * N``; None when it asks for none."""
    content = request.content
    if request.metadata.message_type == QUERY:
        inputs = next(iter(content[QUERY].values()))
        return (1 + int(content[CONFIG][QUERY_DIRECTIONS])) * int(inputs.shape[0])
    transfer = content.array_records.get(TRANSFER)
    key = None if transfer is None else rows_key_in(transfer, NEXT)
    if key is None:
        return None
    return row_count(key.rsplit(".", 1)[1], transfer[key].numpy())


def reply_arrays(reply: Message, name: str, *keys: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of the reply's ArrayRecord `name`; a ReplyError names the first one
    missing (``<name>.<key> is missing``)."""
    record = reply.content.array_records.get(name)
    for key in keys:
        if record is None or key not in record:
            raise ReplyError(f"{name}.{key} is missing")
    return {key: record[key].numpy() for key in keys}


def reply_logits(reply: Message, rows: int, num_classes: int) -> np.ndarray:
    """Validated logits of a reply: float32 [rows, num_classes], finite and bounded
    (`fedkd.reply_checks.logits`).

    Raises ValueError naming what is wrong for a malformed (or malicious) reply.
    """
    array = reply_arrays(reply, LOGITS, LOGITS)[LOGITS]
    return reply_checks.logits(array, (rows, num_classes), f"{LOGITS}.{LOGITS}")


def reply_class_counts(reply: Message, num_classes: int, cap: int = MAX_EXAMPLES) -> np.ndarray:
    """Validated per-class private row counts of a reply: float64 [num_classes], whole, >= 0,
    summing to at most `cap` (`fedkd.reply_checks.class_counts`).

    Raises ValueError naming what is wrong (missing, shape, not whole numbers, negative, too many).
    """
    array = reply_arrays(reply, LOGITS, CLASS_COUNTS)[CLASS_COUNTS]
    counts = reply_checks.class_counts(array, num_classes, cap, f"{LOGITS}.{CLASS_COUNTS}")
    return counts.astype(np.float64)


def soft_targets(record: ArrayRecord, rows: int, num_classes: int) -> np.ndarray:
    """The ``targets.probs`` of a transfer record: float32 [rows, num_classes] probabilities.

    Raises ValueError unless every entry is finite and >= 0 and every row sums to 1 (1e-3).
    """
    probs = record[f"{TARGETS}.probs"].numpy()
    if probs.shape != (rows, num_classes):
        raise ValueError(f"soft targets have shape {probs.shape}, expected {(rows, num_classes)}")
    probs = probs.astype(np.float32)
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("soft targets must be finite and >= 0")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("soft targets' rows must sum to 1")
    return probs


def relation_topk(rows: int, topk: int) -> int:
    """The k of a relation over `rows` rows as it travels: `topk` when ``0 < topk < rows - 1``
    (each row's k largest similarities and their columns), else 0 (all ``rows - 1`` of them)."""
    return topk if 0 < topk < rows - 1 else 0


def reply_relation(reply: Message, rows: int, topk: int = 0) -> np.ndarray:
    """A reply's validated ``knowledge.relation``: float32 [rows, rows - 1] cosine similarities.
    With `topk` the reply holds each row's k largest and their columns (``relation-index``); the
    others are filled with -1, the lowest cosine, which a sharp softmax over the row gives no
    mass."""
    field = f"{KNOWLEDGE}.{RELATION}"
    width, topk = max(rows - 1, 0), relation_topk(rows, topk)
    if not topk:
        array = reply_arrays(reply, KNOWLEDGE, RELATION)[RELATION]
        return reply_checks.relation(array, rows, field)
    arrays = reply_arrays(reply, KNOWLEDGE, RELATION, RELATION_INDEX)
    values = reply_checks.relation(arrays[RELATION], rows, field, width=topk)
    index = reply_checks.relation_index(arrays[RELATION_INDEX], (rows, topk),
                                        f"{KNOWLEDGE}.{RELATION_INDEX}")
    dense = np.full((rows, width), -1.0, dtype=np.float32)
    np.put_along_axis(dense, index, values, axis=1)
    return dense


def reply_prototypes(reply: Message, num_classes: int, dim: int,
                     cap: int = MAX_EXAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """A reply's validated ``knowledge.prototypes`` (float32 [C, P], finite, bounded) and
    ``knowledge.prototype-counts`` (int64 [C], summing to at most `cap`)."""
    return reply_class_table(reply, KNOWLEDGE, PROTOTYPES, PROTOTYPE_COUNTS, dim, num_classes, cap)


def reply_class_table(reply: Message, record: str, values: str, counts: str, width: int,
                      num_classes: int, cap: int = MAX_EXAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """A reply's per-class table ``record.values`` (float32 [C, width], finite, bounded) and its
    ``record.counts`` (int64 [C], whole numbers summing to at most `cap`): prototypes, FD's class
    logits."""
    arrays = reply_arrays(reply, record, values, counts)
    table = reply_checks.logits(arrays[values], (num_classes, width), f"{record}.{values}")
    sizes = reply_checks.class_counts(arrays[counts], num_classes, cap, f"{record}.{counts}")
    return table, sizes


def relation_targets(record: ArrayRecord, rows: int) -> np.ndarray | None:
    """The request's ``targets.relation``: float32 [R, R - 1] row distributions over the first
    R <= `rows` target rows, or None when it carries none. Raises ValueError for another shape,
    negative or non-finite entries, or rows that do not sum to 1 (1e-3) or 0."""
    key = f"{TARGETS}.{RELATION}"
    if key not in record:
        return None
    rel = record[key].numpy().astype(np.float32)
    r = len(rel) if rel.ndim == 2 else -1
    if not 0 <= r <= rows or rel.shape != (r, max(r - 1, 0)):
        raise ValueError(f"{key} has shape {rel.shape}, expected [R, R - 1] with R <= {rows}")
    sums = rel.sum(axis=1)
    if not np.isfinite(rel).all() or (rel < 0).any() or not np.all(
            np.isclose(sums, 1.0, atol=1e-3) | (sums == 0)):
        raise ValueError(f"{key} rows must be distributions (finite, >= 0, summing to 1 or 0)")
    return rel


def prototype_targets(record: ArrayRecord, num_classes: int, dim: int) -> np.ndarray | None:
    """The request's prototypes: float32 [C, P], NaN rows for classes with a count of 0; None
    when it carries none. Raises ValueError for other shapes or non-finite values."""
    if PROTOTYPES not in record:
        return None
    protos = record[PROTOTYPES].numpy().astype(np.float32)
    counts = record[PROTOTYPE_COUNTS].numpy() if PROTOTYPE_COUNTS in record else None
    if protos.shape != (num_classes, dim) or counts is None or counts.shape != (num_classes,):
        raise ValueError(f"{PROTOTYPES} {protos.shape} and {PROTOTYPE_COUNTS} must be "
                         f"[{num_classes}, {dim}] and [{num_classes}]")
    if not np.isfinite(protos).all() or not np.isfinite(counts).all():
        raise ValueError(f"{PROTOTYPES} and {PROTOTYPE_COUNTS} must be finite")
    protos[counts <= 0] = np.nan
    return protos


def finite_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The state dict of a weights record; raises ValueError if a floating value is not finite."""
    state = record.to_torch_state_dict()
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"weights {key!r} are not finite")
    return state


# --- records as plain values (checkpoints) -------------------------------------------------------
_KINDS = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}


def array_record_state(record: ArrayRecord) -> dict[str, dict[str, Any]]:
    """Every array of `record` as its raw bytes, dtype, shape and serialisation type, in order."""
    return {key: {"dtype": array.dtype, "shape": list(array.shape), "stype": array.stype,
                  "data": bytes(array.data)} for key, array in record.items()}


def array_record_from_state(state: dict[str, dict[str, Any]]) -> ArrayRecord:
    """The `ArrayRecord` `array_record_state` described, the same bytes in the same order."""
    return ArrayRecord(array_dict={
        key: Array(dtype=a["dtype"], shape=tuple(a["shape"]), stype=a["stype"], data=a["data"])
        for key, a in state.items()})


def record_dict_state(records: RecordDict) -> dict[str, dict[str, Any]]:
    """A `RecordDict` (e.g. a node's ``Context.state``) as plain values: per record its kind
    (``array``, ``config``, ``metric``) and items."""
    state = {}
    for name, record in records.items():
        if isinstance(record, ArrayRecord):
            state[name] = {"kind": "array", "items": array_record_state(record)}
        else:
            kind = "config" if isinstance(record, ConfigRecord) else "metric"
            state[name] = {"kind": kind, "items": dict(record)}
    return state


def record_dict_from_state(state: dict[str, dict[str, Any]]) -> RecordDict:
    """Inverse of `record_dict_state`."""
    records = RecordDict()
    for name, entry in state.items():
        if entry["kind"] == "array":
            records[name] = array_record_from_state(entry["items"])
        elif entry["kind"] in _KINDS:
            records[name] = _KINDS[entry["kind"]](dict(entry["items"]))
        else:
            raise ValueError(f"record {name!r} has an unknown kind {entry['kind']!r}")
    return records
