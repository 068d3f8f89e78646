"""The codec on the wire: soft targets and weights encoded on the way to a node, logits and
weights on the way back (`fedkd.codecs` holds the maths; ``codec=`` config group).

An encoded array ``<key>`` travels as one uint8 array ``<key>|<codec name>`` (`pack`): the
array's shape (one byte, its rank, then uint32 dimensions) and then the codec's parts
(`fedkd.codecs.layout`) back to back, so a payload pays one array header, not one per part.
Requests name the codec in their config (``fedkd.codec``, JSON) and the node answers with the
same one. What is encoded:

- request ``transfer``: ``targets.probs`` (`fedkd.codecs.encode_probs`);
- request and reply ``arrays`` (weights of FedAvg and FedDF): floating tensors, when the codec
  applies to weights (`fedkd.codecs.applies_to_weights`); integer buffers travel as they are;
- reply ``logits``: ``logits`` (`fedkd.codecs.encode_logits`); ``class_counts`` as they are.

Decoding on the server is a check: a payload of the wrong size, shape or content raises
ValueError naming the field, and the wire drops the reply (`fedkd.wire.WireGrid`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedkd import codecs
from fedkd.protocol import (
    ARRAYS, CODEC, CONFIG, LOGITS, PART_SEPARATOR, TARGETS, TRANSFER, row_count,
)
from fedkd.records import asked_rows, rows_key_in

PROBS = f"{TARGETS}.probs"
MAX_DIMS, MAX_VALUES = 8, 1 << 28
"""Largest array a payload may name (rank, values)."""


def pack(spec: Mapping[str, Any], shape: tuple[int, ...], parts: Mapping[str, np.ndarray],
         dtype: Any = None) -> np.ndarray:
    """One uint8 buffer: rank, dimensions (uint32), then the parts in `codecs.layout` order."""
    head = np.concatenate([np.array([len(shape)], np.uint8),
                           np.asarray(shape, dtype="<u4").view(np.uint8)])
    body = [np.ascontiguousarray(parts[name], dtype=want).view(np.uint8).reshape(-1)
            for name, (want, _) in sorted(codecs.layout(spec, shape, dtype).items())]
    return np.concatenate([head, *body])


def unpack(spec: Mapping[str, Any], buffer: np.ndarray, what: str, dtype: Any = None
           ) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """The shape and parts of a `pack`ed buffer; ValueError naming `what` if it is malformed."""
    if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or buffer.ndim != 1 \
            or buffer.size < 1 or buffer[0] > MAX_DIMS or buffer.size < 1 + 4 * int(buffer[0]):
        raise ValueError(f"{what} must be a packed uint8 buffer (rank <= {MAX_DIMS}, dims)")
    rank = int(buffer[0])
    shape = tuple(int(d) for d in buffer[1:1 + 4 * rank].view("<u4"))
    if float(np.prod(shape, dtype=np.float64)) > MAX_VALUES:
        raise ValueError(f"{what} names more than {MAX_VALUES:,} values")
    expected = sorted(codecs.layout(spec, shape, dtype).items())
    sizes = [np.dtype(d).itemsize * int(np.prod(s, dtype=np.int64)) for _, (d, s) in expected]
    body = buffer[1 + 4 * rank:]
    if body.size != sum(sizes):
        raise ValueError(f"{what} holds {body.size} bytes after its shape {shape}, the codec "
                         f"needs {sum(sizes)}")
    parts, start = {}, 0
    for (name, (want, part_shape)), size in zip(expected, sizes):
        parts[name] = body[start:start + size].copy().view(want).reshape(part_shape)
        start += size
    return shape, parts


def _key(key: str, spec: Mapping[str, Any]) -> str:
    return f"{key}{PART_SEPARATOR}{spec['name']}"


def _encoded(record: ArrayRecord, spec: Mapping[str, Any], what: str) -> list[str]:
    """Base keys of `record`'s encoded arrays; one under another codec is refused."""
    bases = []
    for key in record.keys():
        if PART_SEPARATOR in key:
            base, name = key.split(PART_SEPARATOR, 1)
            if name != spec["name"]:
                raise ValueError(f"{what}.{key} is not encoded with the run's codec {spec['name']!r}")
            bases.append(base)
    return bases


def encode_weights(spec: Mapping[str, Any], record: ArrayRecord) -> ArrayRecord:
    """A weights record with every floating tensor encoded (in the same key order)."""
    if not codecs.applies_to_weights(spec):
        return record
    out: dict[str, Array] = {}
    for key, array in record.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            parts = codecs.encode_array(spec, values.astype(np.float32))
            out[_key(key, spec)] = Array(pack(spec, values.shape, parts, np.float32))
        else:
            out[key] = array
    return ArrayRecord(array_dict=out)


def decode_weights(spec: Mapping[str, Any], record: ArrayRecord, what: str) -> ArrayRecord:
    """Inverse of `encode_weights`; ValueError names the bad field."""
    if not _encoded(record, spec, what):
        return record
    out: dict[str, Array] = {}
    for key, array in record.items():
        if PART_SEPARATOR not in key:
            out[key] = array
            continue
        base, field = key.split(PART_SEPARATOR, 1)[0], f"{what}.{key}"
        shape, parts = unpack(spec, array.numpy(), field, np.float32)
        out[base] = Array(codecs.decode_array(spec, parts, shape, np.float32, what=field))
    return ArrayRecord(array_dict=out)


def _replace(message: Message, name: str, record: Any) -> None:
    records = dict(message.content.items())
    records[name] = record
    message.content = RecordDict(records)


class WireCodec:
    """The server's half: encode requests, decode replies (in place), for one run.

    Parameters
    ----------
    spec : mapping
        A codec spec (`fedkd.codecs.check_codec`), e.g. ``{"name": "int8"}``.
    num_classes : int
        Classes of the run (the width of logits and soft targets).
    """

    def __init__(self, spec: Mapping[str, Any], num_classes: int) -> None:
        self.spec = codecs.check_codec(spec)
        self.text = codecs.codec_to_json(self.spec)
        self.num_classes = int(num_classes)

    @classmethod
    def of(cls, spec: Mapping[str, Any] | None, num_classes: int) -> WireCodec | None:
        """The codec of a run's ``codec`` config; None for ``none`` (nothing is encoded)."""
        if spec is None or spec.get("name", "none") == "none":
            return None
        return cls(spec, num_classes)

    def encode_request(self, message: Message) -> Message:
        """A copy of `message` naming the codec, its soft targets and weights encoded."""
        if message.has_error():
            return message
        records = dict(message.content.items())
        if CONFIG in records:
            records[CONFIG] = ConfigRecord({**records[CONFIG], CODEC: self.text})
        transfer = records.get(TRANSFER)
        if isinstance(transfer, ArrayRecord) and PROBS in transfer:
            probs = transfer[PROBS].numpy()
            buffer = pack(self.spec, probs.shape, codecs.encode_probs(self.spec, probs))
            kept = {k: v for k, v in transfer.items() if k != PROBS}
            records[TRANSFER] = ArrayRecord(array_dict={**kept, _key(PROBS, self.spec): Array(buffer)})
        if isinstance(records.get(ARRAYS), ArrayRecord):
            records[ARRAYS] = encode_weights(self.spec, records[ARRAYS])
        meta = message.metadata
        return Message(RecordDict(records), dst_node_id=meta.dst_node_id,
                       message_type=meta.message_type, group_id=meta.group_id, ttl=meta.ttl)

    def decode_reply(self, reply: Message, request: Message) -> None:
        """Decode `reply`'s logits and weights in place; ValueError names the bad field."""
        content = reply.content
        logits = content.array_records.get(LOGITS)
        if logits is not None and _encoded(logits, self.spec, LOGITS):
            if _encoded(logits, self.spec, LOGITS) != [LOGITS]:
                raise ValueError(f"{LOGITS}.{_encoded(logits, self.spec, LOGITS)[0]} is not an "
                                 "encoded array a reply carries")
            rows, field = asked_rows(request), f"{LOGITS}.{_key(LOGITS, self.spec)}"
            if rows is None:
                raise ValueError(f"{LOGITS} were not asked for")
            shape, parts = unpack(self.spec, logits[_key(LOGITS, self.spec)].numpy(), field)
            if shape != (rows, self.num_classes):
                raise ValueError(f"{field} has shape {shape}, expected {(rows, self.num_classes)}")
            values = codecs.decode_logits(self.spec, parts, rows, self.num_classes, what=field)
            kept = {k: v for k, v in logits.items() if PART_SEPARATOR not in k}
            _replace(reply, LOGITS, ArrayRecord(array_dict={**kept, LOGITS: Array(values)}))
        arrays = content.array_records.get(ARRAYS)
        if arrays is not None:
            _replace(reply, ARRAYS, decode_weights(self.spec, arrays, ARRAYS))


# --- the node's half (`fedkd.client.wire_mod`) -------------------------------------------------
@lru_cache(maxsize=8)
def _spec(text: str) -> dict[str, Any]:
    return codecs.codec_from_json(text)


def decode_request(msg: Message) -> dict[str, Any] | None:
    """Decode `msg`'s soft targets and weights in place; return its codec (None: none)."""
    config = msg.content.config_records.get(CONFIG) if msg.has_content() else None
    if config is None or CODEC not in config:
        return None
    spec = _spec(str(config[CODEC]))
    transfer = msg.content.array_records.get(TRANSFER)
    if transfer is not None and _encoded(transfer, spec, TRANSFER):
        from fedkd.settings import ClientSettings

        field = f"{TRANSFER}.{_key(PROBS, spec)}"
        if _encoded(transfer, spec, TRANSFER) != [PROBS]:
            raise ValueError(f"{TRANSFER} carries encoded arrays other than {PROBS}")
        classes = int(ClientSettings.from_config(config).data["num_classes"])
        shape, parts = unpack(spec, transfer[_key(PROBS, spec)].numpy(), field)
        target = rows_key_in(transfer, TARGETS)
        rows = None if target is None else row_count(target.rsplit(".", 1)[1],
                                                     transfer[target].numpy())
        if len(shape) != 2 or shape[1] != classes or rows not in (None, shape[0]):
            raise ValueError(f"{field} has shape {shape}, expected ({rows}, {classes})")
        probs = codecs.decode_probs(spec, parts, shape[0], classes, what=field)
        kept = {k: v for k, v in transfer.items() if PART_SEPARATOR not in k}
        _replace(msg, TRANSFER, ArrayRecord(array_dict={**kept, PROBS: Array(probs)}))
    arrays = msg.content.array_records.get(ARRAYS)
    if arrays is not None:
        _replace(msg, ARRAYS, decode_weights(spec, arrays, ARRAYS))
    return spec


def encode_reply(reply: Message, spec: Mapping[str, Any]) -> None:
    """Encode `reply`'s logits and weights in place with the request's codec."""
    logits = reply.content.array_records.get(LOGITS)
    if logits is not None and LOGITS in logits:
        values = logits[LOGITS].numpy()
        buffer = pack(spec, values.shape, codecs.encode_logits(spec, values))
        kept = {k: v for k, v in logits.items() if k != LOGITS}
        _replace(reply, LOGITS, ArrayRecord(array_dict={**kept, _key(LOGITS, spec): Array(buffer)}))
    arrays = reply.content.array_records.get(ARRAYS)
    if arrays is not None:
        _replace(reply, ARRAYS, encode_weights(spec, arrays))
