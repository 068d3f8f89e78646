"""The protocol's Flower records: build the transfer record, read rows and logits back.

Key names live in `fedkd.protocol`; this module only turns them into (and out of) `flwr.app`
records, so both the server strategies and the ClientApp use one codec.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedkd.protocol import CLASS_COUNTS, LOGITS, NEXT, TARGETS, rows_key, rows_to_inputs
from fedkd import reply_checks
from fedkd.reply_checks import MAX_EXAMPLES, ReplyError


def transfer_record(
    soft_targets: np.ndarray | None = None,
    target_rows: np.ndarray | None = None,
    next_rows: np.ndarray | None = None,
) -> ArrayRecord:
    """Build the ``transfer`` record; row arrays of integers are indices, others inputs."""
    record = ArrayRecord()
    if soft_targets is not None:
        record[f"{TARGETS}.probs"] = Array(np.asarray(soft_targets, dtype=np.float32))
        record[rows_key(TARGETS, target_rows)] = Array(np.asarray(target_rows))
    if next_rows is not None:
        record[rows_key(NEXT, next_rows)] = Array(np.asarray(next_rows))
    return record


def rows_from(record: ArrayRecord, prefix: str, public_x: torch.Tensor) -> torch.Tensor | None:
    """Inputs named by ``<prefix>.indices`` (rows of `public_x`) or ``<prefix>.inputs``."""
    for kind in ("indices", "inputs"):
        key = f"{prefix}.{kind}"
        if key in record:
            return rows_to_inputs(record[key].numpy(), public_x, prefix)
    return None


def reply_logits(reply: Message, rows: int, num_classes: int) -> np.ndarray:
    """Validated logits of a reply: float32 [rows, num_classes], finite and bounded
    (`fedkd.reply_checks.logits`).

    Raises ValueError naming what is wrong for a malformed (or malicious) reply.
    """
    if LOGITS not in reply.content or LOGITS not in reply.content[LOGITS]:
        raise ReplyError(f"{LOGITS}.{LOGITS} is missing")
    return reply_checks.logits(reply.content[LOGITS][LOGITS].numpy(), (rows, num_classes),
                               f"{LOGITS}.{LOGITS}")


def reply_class_counts(reply: Message, num_classes: int, cap: int = MAX_EXAMPLES) -> np.ndarray:
    """Validated per-class private row counts of a reply: float64 [num_classes], whole, >= 0,
    summing to at most `cap` (`fedkd.reply_checks.class_counts`).

    Raises ValueError naming what is wrong (missing, shape, not whole numbers, negative, too many).
    """
    record = reply.content[LOGITS] if LOGITS in reply.content else None
    if record is None or CLASS_COUNTS not in record:
        raise ReplyError(f"{LOGITS}.{CLASS_COUNTS} is missing")
    counts = reply_checks.class_counts(record[CLASS_COUNTS].numpy(), num_classes, cap,
                                       f"{LOGITS}.{CLASS_COUNTS}")
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


def finite_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The state dict of a weights record; raises ValueError if a floating value is not finite."""
    state = record.to_torch_state_dict()
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"weights {key!r} are not finite")
    return state
