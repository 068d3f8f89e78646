"""The fused KD message: record names and keys shared by the server strategies and the ClientApp.

Request (server -> client, message type ``train.distill``)
    ``config``   ConfigRecord: ``fedkd.settings`` (JSON, see `fedkd.client.settings`), ``server-round``
    ``transfer`` ArrayRecord, every key optional:
        ``targets.probs``   soft targets [N, C] from the previous round
        ``targets.indices`` rows of the public set they belong to [N], or
        ``targets.inputs``  the (synthetic) inputs they belong to [N, ...]
        ``next.indices``    rows of the public set to return logits on [M], or
        ``next.inputs``     (synthetic) inputs to return logits on [M, ...]
Reply (client -> server)
    ``logits``   ArrayRecord ``logits`` [M, C] float32 (absent when nothing was asked)
    ``metrics``  MetricRecord: ``partition-id``, ``num-examples``, ``train-loss``, ``digest-loss``,
                 ``test-accuracy`` and ``test-loss`` when the student was evaluated this round.
Nothing else leaves a client.

Query (server -> client, message type ``query``; black-box generators, `fedkd.generators`)
    ``config``   as above, plus ``query-seed``, ``query-directions`` Q and ``query-mu``
    ``query``    ArrayRecord ``query.inputs`` [N, ...]
    The client answers logits on `expand_query` (the inputs, then Q seeded perturbations of them):
    ``logits`` [(1 + Q) * N, C] and ``metrics`` (``partition-id``, ``num-examples``); it trains
    nothing and keeps no state.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

MESSAGE_TYPE = "train.distill"
CONFIG, TRANSFER, LOGITS, METRICS = "config", "transfer", "logits", "metrics"
TARGETS, NEXT = "targets", "next"
QUERY = "query"


def transfer_record(
    soft_targets: np.ndarray | None = None,
    target_rows: np.ndarray | None = None,
    next_rows: np.ndarray | None = None,
) -> ArrayRecord:
    """Build the ``transfer`` record; row arrays of integers are indices, others inputs."""
    record = ArrayRecord()
    if soft_targets is not None:
        record[f"{TARGETS}.probs"] = Array(np.asarray(soft_targets, dtype=np.float32))
        record[_rows_key(TARGETS, target_rows)] = Array(np.asarray(target_rows))
    if next_rows is not None:
        record[_rows_key(NEXT, next_rows)] = Array(np.asarray(next_rows))
    return record


def _rows_key(prefix: str, rows: np.ndarray | None) -> str:
    if rows is None:
        raise ValueError(f"{prefix} rows are required")
    kind = "indices" if np.issubdtype(np.asarray(rows).dtype, np.integer) else "inputs"
    return f"{prefix}.{kind}"


def rows_from(record: ArrayRecord, prefix: str, public_x: torch.Tensor) -> torch.Tensor | None:
    """Inputs named by ``<prefix>.indices`` (rows of `public_x`) or ``<prefix>.inputs``."""
    for kind in ("indices", "inputs"):
        key = f"{prefix}.{kind}"
        if key in record:
            return rows_to_inputs(record[key].numpy(), public_x, prefix)
    return None


def rows_to_inputs(rows: np.ndarray, public_x: torch.Tensor, name: str = "rows") -> torch.Tensor:
    """Integer `rows` pick rows of the public set; float `rows` are (synthetic) inputs themselves.

    Raises ValueError for indices outside the public set or inputs of another shape.
    """
    if np.issubdtype(rows.dtype, np.integer):
        idx = rows.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(public_x)):
            raise ValueError(f"{name}.indices reach outside the public set of {len(public_x)} rows")
        return public_x[torch.from_numpy(idx)]
    inputs = rows.astype(np.float32)
    if inputs.shape[1:] != tuple(public_x.shape[1:]):
        raise ValueError(
            f"{name}.inputs have shape {inputs.shape[1:]}, the data has {tuple(public_x.shape[1:])}"
        )
    return torch.from_numpy(inputs)


def reply_logits(reply: Message, rows: int, num_classes: int) -> np.ndarray:
    """Validated logits of a reply: float32 [rows, num_classes], all finite.

    Raises ValueError naming what is wrong for a malformed (or malicious) reply.
    """
    if LOGITS not in reply.content or LOGITS not in reply.content[LOGITS]:
        raise ValueError("reply carries no logits")
    logits = reply.content[LOGITS][LOGITS].numpy()
    if logits.shape != (rows, num_classes):
        raise ValueError(f"logits have shape {logits.shape}, expected {(rows, num_classes)}")
    if not np.issubdtype(logits.dtype, np.floating) or not np.isfinite(logits).all():
        raise ValueError("logits must be finite floating-point numbers")
    return logits.astype(np.float32)


def query_directions(seed: int, directions: int, shape: tuple[int, ...]) -> np.ndarray:
    """The Q standard-normal directions ``[Q, *shape]`` that `seed` names (float32).

    Server and client draw them alike, so only the seed travels, not Q copies of the inputs."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((directions, *shape), dtype=np.float32)


def expand_query(inputs: np.ndarray, seed: int, directions: int, mu: float) -> np.ndarray:
    """``[x, x + mu * u_1, ..., x + mu * u_Q]`` stacked along rows: ``[(1 + Q) * N, ...]``."""
    x = np.asarray(inputs, dtype=np.float32)
    if directions < 0 or not np.isfinite(mu):
        raise ValueError(f"query-directions must be >= 0 and query-mu finite, got {directions}, {mu}")
    u = query_directions(seed, directions, x.shape)
    return np.concatenate([x[None], x[None] + np.float32(mu) * u]).reshape(-1, *x.shape[1:])
