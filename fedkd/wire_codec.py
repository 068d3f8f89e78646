"""The codec on the wire: soft targets and weights encoded on the way to a node, logits and
weights on the way back (`fedkd.codecs` holds the maths; ``codec=`` config group).

An encoded array ``<key>`` travels as its parts ``<key>|<part>`` (`fedkd.protocol.PART_SEPARATOR`);
an encoded weight tensor adds ``<key>|shape``. Requests name the codec in their config
(``fedkd.codec``, JSON), and the node answers with the same one. Which arrays are encoded:

- request ``transfer``: ``targets.probs`` (`fedkd.codecs.encode_probs`);
- request and reply ``arrays`` (weights of FedAvg and FedDF): floating tensors, when the codec
  applies to weights (`fedkd.codecs.applies_to_weights`); integer buffers travel as they are;
- reply ``logits``: ``logits`` (`fedkd.codecs.encode_logits`); ``class_counts`` as they are.

Decoding on the server is a check: parts of the wrong type or shape raise ValueError naming
the field, and the wire drops the reply (`fedkd.wire.WireGrid`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedkd import codecs
from fedkd.protocol import ARRAYS, CODEC, CONFIG, LOGITS, PART_SEPARATOR, TARGETS, TRANSFER
from fedkd.records import asked_rows

PROBS = f"{TARGETS}.probs"
SHAPE = "shape"
MAX_DIMS, MAX_VALUES = 8, 1 << 28
"""Largest weight tensor a reply may name (dimensions, values)."""


def _parts_of(record: ArrayRecord, key: str) -> dict[str, np.ndarray]:
    prefix = f"{key}{PART_SEPARATOR}"
    return {k[len(prefix):]: v.numpy() for k, v in record.items() if k.startswith(prefix)}


def _encoded_keys(record: ArrayRecord) -> list[str]:
    """Base keys of the encoded arrays in `record`, in order."""
    keys: list[str] = []
    for key in record.keys():
        if PART_SEPARATOR in key:
            base = key.split(PART_SEPARATOR, 1)[0]
            if base not in keys:
                keys.append(base)
    return keys


def _with_parts(record: ArrayRecord, key: str, parts: Mapping[str, np.ndarray]) -> dict[str, Array]:
    return {f"{key}{PART_SEPARATOR}{name}": Array(np.ascontiguousarray(part))
            for name, part in parts.items()}


def encode_weights(spec: Mapping[str, Any], record: ArrayRecord) -> ArrayRecord:
    """A weights record with every floating tensor encoded (in the same key order)."""
    if not codecs.applies_to_weights(spec):
        return record
    out: dict[str, Array] = {}
    for key, array in record.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            parts = dict(codecs.encode_array(spec, values))
            parts[SHAPE] = np.asarray(values.shape, dtype=np.uint32)
            out.update(_with_parts(record, key, parts))
        else:
            out[key] = array
    return ArrayRecord(array_dict=out)


def decode_weights(spec: Mapping[str, Any], record: ArrayRecord, what: str) -> ArrayRecord:
    """Inverse of `encode_weights`; ValueError names the bad field."""
    encoded = _encoded_keys(record)
    if not encoded:
        return record
    out: dict[str, Array] = {}
    for key, array in record.items():
        if PART_SEPARATOR not in key:
            out[key] = array
            continue
        base = key.split(PART_SEPARATOR, 1)[0]
        if base in out:
            continue
        parts = _parts_of(record, base)
        shape = _shape(parts.pop(SHAPE, None), f"{what}.{base}{PART_SEPARATOR}{SHAPE}")
        values = codecs.decode_array(spec, parts, shape, np.dtype(np.float32))
        out[base] = Array(np.asarray(values, dtype=np.float32).reshape(shape))
    return ArrayRecord(array_dict=out)


def _shape(value: np.ndarray | None, what: str) -> tuple[int, ...]:
    if value is None or value.dtype != np.uint32 or value.ndim != 1 or value.size > MAX_DIMS:
        raise ValueError(f"{what} must be uint32 [<= {MAX_DIMS}]")
    shape = tuple(int(n) for n in value)
    if int(np.prod(shape, dtype=np.float64)) > MAX_VALUES:
        raise ValueError(f"{what} names more than {MAX_VALUES:,} values")
    return shape


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
            parts = codecs.encode_probs(self.spec, transfer[PROBS].numpy())
            kept = {k: v for k, v in transfer.items() if k != PROBS}
            records[TRANSFER] = ArrayRecord(array_dict={**kept, **_with_parts(transfer, PROBS, parts)})
        if isinstance(records.get(ARRAYS), ArrayRecord):
            records[ARRAYS] = encode_weights(self.spec, records[ARRAYS])
        meta = message.metadata
        return Message(RecordDict(records), dst_node_id=meta.dst_node_id,
                       message_type=meta.message_type, group_id=meta.group_id, ttl=meta.ttl)

    def decode_reply(self, reply: Message, request: Message) -> None:
        """Decode `reply`'s logits and weights in place; ValueError names the bad field."""
        content = reply.content
        logits = content.array_records.get(LOGITS)
        if logits is not None and _encoded_keys(logits):
            if _encoded_keys(logits) != [LOGITS]:
                raise ValueError(f"{LOGITS}.{_encoded_keys(logits)[0]} is not an encoded array "
                                 "a reply carries")
            rows = asked_rows(request)
            if rows is None:
                raise ValueError(f"{LOGITS} were not asked for")
            parts = _parts_of(logits, LOGITS)
            values = codecs.decode_logits(self.spec, parts, rows, self.num_classes)
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
    if transfer is not None and _encoded_keys(transfer):
        parts = _parts_of(transfer, PROBS)
        values = next(iter(parts.values()), np.zeros((0,)))
        from fedkd.settings import ClientSettings

        classes = int(ClientSettings.from_config(config).data["num_classes"])
        probs = codecs.decode_probs(spec, parts, int(values.shape[0]), classes)
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
        parts = codecs.encode_logits(spec, logits[LOGITS].numpy())
        kept = {k: v for k, v in logits.items() if k != LOGITS}
        _replace(reply, LOGITS, ArrayRecord(array_dict={**kept, **_with_parts(logits, LOGITS, parts)}))
    arrays = reply.content.array_records.get(ARRAYS)
    if arrays is not None:
        _replace(reply, ARRAYS, encode_weights(spec, arrays))
