"""The wire protocol: every message type, record name and key that crosses the wire.

Flower-free: `fedkd.records` builds and reads the Flower records with these names.

Request (server -> client, message type ``train.distill``)
    ``config``   ConfigRecord: ``fedkd.settings`` (JSON, see `fedkd.settings`), ``server-round``
    ``transfer`` ArrayRecord, every key optional:
        ``targets.probs``   soft targets [N, C] from the previous round
        ``targets.<rows>``  the rows they belong to [N] (absent when the node holds them: the
                            config's ``fedkd.targets-rows`` names them by digest)
        ``next.<rows>``     the rows to return logits on [M]
        where ``<rows>`` is ``mask`` (rows of the public set in increasing order, as packed
        bits), ``indices`` (rows of the public set, any order, smallest unsigned int type) or
        ``inputs`` ((synthetic) inputs [N, ...], float32): `encode_rows`, `decode_rows`.
    Constant size: the settings travel once per node (then ``fedkd.settings-digest`` alone),
    the rows a node answered on are not sent back to it, and with ``codec`` other than ``none``
    ``targets.probs`` and weights travel encoded (``<key>|<part>``, `fedkd.wire_codec`).
Reply (client -> server)
    ``logits``   ArrayRecord ``logits`` [M, C] float32 (absent when nothing was asked)
    ``metrics``  MetricRecord: ``partition-id``, ``num-examples``, ``train-loss``, ``digest-loss``,
                 ``test-accuracy`` and ``test-loss`` when the student was evaluated this round;
                 with ``privacy=dpsgd`` ``dp-epsilon``, ``dp-delta``, ``dp-noise-multiplier``,
                 ``dp-sample-rate``, ``dp-steps`` instead of the losses on private rows.
    ``knowledge`` ArrayRecord ``relation``, ``prototypes``, ``prototype-counts`` (`KNOWLEDGE`):
                 only when the run shares them (strategies ``relational``, ``fedproto``).
    ``node``     ConfigRecord ``arch``, ``role``: deployed nodes only (`fedkd.client.report`),
                 which also add ``compute-s`` to ``metrics``.
Nothing else leaves a client. The server checks every field of every reply before anything
uses it (`fedkd.reply_checks`, applied by `fedkd.reply_guard.ReplyGuard`).

Query (server -> client, message type ``query``; black-box generators, `fedkd.generators`)
    ``config``   as above, plus ``query-seed``, ``query-directions`` Q and ``query-mu``
    ``query``    ArrayRecord ``query.inputs`` [N, ...]
    The client answers logits on `expand_query` (the inputs, then Q seeded perturbations of them):
    ``logits`` [(1 + Q) * N, C] and ``metrics`` (``partition-id``, ``num-examples``); it trains
    nothing and keeps no state.

Who-am-I (server -> client, message type ``query.whoami``; sampling with ``fraction_train < 1``)
    An empty message. The client answers ``metrics`` with its ``partition-id`` and nothing else,
    so the server can sample partition ids, not random node ids (`fedkd.sampling`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# --- message types -------------------------------------------------------------------------------
MESSAGE_TYPE = "train.distill"
"""The fused KD round (FedMD, DS-FL, local)."""
FD_MESSAGE_TYPE = "train.fd"
"""FD / FedDistill's round: per-class mean logits (`fedkd.client.fd`)."""
QUERY = "query"
"""A black-box generator's query wave (record ``query``, message type ``query``)."""
WHOAMI_ACTION = "whoami"
WHOAMI = f"{QUERY}.{WHOAMI_ACTION}"
"""Which partition a node holds (empty request; the reply's ``metrics``: ``partition-id`` only)."""
TRAIN, EVALUATE = "train", "evaluate"
"""Parameter exchange (Flower's FedAvg, FedDF)."""

# --- records -------------------------------------------------------------------------------------
CONFIG, TRANSFER, LOGITS, METRICS = "config", "transfer", "logits", "metrics"
ARRAYS = "arrays"
"""The weights record of parameter exchange (Flower's own name)."""
TARGETS, NEXT = "targets", "next"
"""Prefixes of the transfer record's keys (``targets.probs``, ``next.indices``, ...)."""
CLASS_LOGITS, CLASS_COUNTS = "class_logits", "class_counts"
"""FD's keys: in the ``logits`` record of a reply, and as ``targets.<key>`` in the request."""
KNOWLEDGE = "knowledge"
"""A reply's relational and prototype knowledge (ArrayRecord), each key only when the run asks:
``relation`` [R, R - 1], the cosine similarities of the student's tap between the first R
``next`` rows (R = ``distill.relation_rows`` or all rows when fewer), the diagonal left out, or
with ``distill.relation_topk`` = k each row's k largest of them [R, k] and their columns in that
layout, ``relation-index`` [R, k] (int16); ``prototypes`` [C, P] and
``prototype-counts`` [C], per-class means of the projected tap over the private rows (0 for a
class without rows; ``distill.prototype_dim``)."""
RELATION, PROTOTYPES, PROTOTYPE_COUNTS = "relation", "prototypes", "prototype-counts"
RELATION_INDEX = "relation-index"
"""Keys of ``knowledge``; in a request's ``transfer`` record the aggregates travel as
``targets.relation`` [N, N - 1] (row distributions over the other target rows), ``prototypes``
[C, P] and ``prototype-counts`` [C] (0: no prototype for the class)."""
NODE = "node"
"""A deployed node's ConfigRecord in its replies: ``arch`` and ``role`` (`fedkd.client.report`)."""
NODE_ARCH, NODE_ROLE = "arch", "role"

# --- config keys (server -> client) --------------------------------------------------------------
SETTINGS_KEY = "fedkd.settings"
"""The run settings as JSON (`fedkd.settings.ClientSettings`)."""
SETTINGS_DIGEST = "fedkd.settings-digest"
"""The digest of the settings document (`text_digest`); alone when the node holds the document."""
TARGETS_HELD = "fedkd.targets-rows"
"""The digest of the rows the soft targets belong to, when the node holds them (the last
``next.<rows>`` it answered on) and the ``targets.<rows>`` array is left out."""
CODEC = "fedkd.codec"
"""The codec of this message's encoded arrays, and of the reply's (`fedkd.codecs`, as JSON)."""
PART_SEPARATOR = "|"
"""Encoded array keys: ``<key>|<part>`` (``targets.probs|values``, ``logits|scale``)."""
SERVER_ROUND = "server-round"
QUERY_SEED, QUERY_DIRECTIONS, QUERY_MU = "query-seed", "query-directions", "query-mu"

# --- metric keys (client -> server) --------------------------------------------------------------
PARTITION_ID, NUM_EXAMPLES = "partition-id", "num-examples"
TRAIN_LOSS, DIGEST_LOSS = "train-loss", "digest-loss"
TEST_ACCURACY, TEST_LOSS = "test-accuracy", "test-loss"
OWN_ACCURACY = "test-accuracy-own"
"""Accuracy on the client's own-label test chunk (FedGen's per-user metric), every round."""
PHASES = ("restore", "digest", "revisit", "logits", "evaluate", "save")
"""The timed phases of a client's round (`fedkd.timing`), reported with ``distill.profile``."""


def phase_key(phase: str) -> str:
    """The metric key of a phase's wall seconds: ``time-<phase>-s``."""
    return f"time-{phase}-s"


COMPUTE_S = "compute-s"
"""Seconds a deployed node's handler computed (added by `fedkd.client.report.report_mod`)."""
DP_EPSILON, DP_DELTA = "dp-epsilon", "dp-delta"
"""``privacy=dpsgd``: the (epsilon, delta) a client's DP-SGD has spent so far (`fedkd.dpsgd`)."""
DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE, DP_STEPS = "dp-noise-multiplier", "dp-sample-rate", "dp-steps"
"""``privacy=dpsgd``: the accountant's inputs (noise multiplier, Poisson rate, steps so far)."""
DP_METRICS = (DP_EPSILON, DP_DELTA, DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE, DP_STEPS)
REPLY_METRICS = (PARTITION_ID, NUM_EXAMPLES, TRAIN_LOSS, DIGEST_LOSS, TEST_ACCURACY, TEST_LOSS,
                 OWN_ACCURACY, *(phase_key(p) for p in PHASES), COMPUTE_S, *DP_METRICS)
"""Every metric a fedkd client sends (``compute-s``: deployed nodes only); the server drops a
reply carrying any other."""


ROW_KINDS = ("mask", "indices", "inputs")
"""How transfer rows travel (`encode_rows`)."""
MAX_PUBLIC_ROWS = 1 << 31
"""Most rows a public set may have (a mask or index array reaching further is refused)."""


def encode_rows(rows: np.ndarray) -> tuple[str, np.ndarray]:
    """``(kind, array)`` of transfer rows, the smallest form that says the same:

    - integers in strictly increasing order: ``mask``, packed bits (little bit order), bit i set
      when public row i is asked (a 400-row public set costs 50 bytes whatever is asked);
    - other integers: ``indices`` in the smallest unsigned type that holds them;
    - anything else: ``inputs``, float32.
    """
    rows = np.asarray(rows)
    if not np.issubdtype(rows.dtype, np.integer):
        return "inputs", rows.astype(np.float32, copy=False)
    idx = rows.astype(np.int64, copy=False).reshape(-1)
    if idx.size and idx.min() < 0:
        raise ValueError("transfer row indices must be >= 0")
    if idx.size and np.all(np.diff(idx) > 0):
        bits = np.zeros(int(idx[-1]) + 1, dtype=bool)
        bits[idx] = True
        return "mask", np.packbits(bits, bitorder="little")
    top = int(idx.max()) if idx.size else 0
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if top <= np.iinfo(t).max)
    return "indices", idx.astype(dtype)


def decode_rows(kind: str, array: np.ndarray, name: str = "rows") -> np.ndarray:
    """Inverse of `encode_rows`: int64 indices (``mask``, ``indices``) or float32 inputs.

    Raises ValueError for an unknown kind, a mask or indices of the wrong type or shape."""
    array = np.asarray(array)
    if kind == "inputs":
        if not np.issubdtype(array.dtype, np.floating) or array.ndim < 2:
            raise ValueError(f"{name}.inputs must be a float array [N, ...], got {array.dtype} "
                             f"{array.shape}")
        return array
    if kind == "mask":
        if array.dtype != np.uint8 or array.ndim != 1 or array.size * 8 > MAX_PUBLIC_ROWS:
            raise ValueError(f"{name}.mask must be packed bits (uint8 [n]), got {array.dtype} "
                             f"{array.shape}")
        return np.flatnonzero(np.unpackbits(array, bitorder="little")).astype(np.int64)
    if kind == "indices":
        if not np.issubdtype(array.dtype, np.integer) or array.ndim != 1:
            raise ValueError(f"{name}.indices must be integers [N], got {array.dtype} "
                             f"{array.shape}")
        return array.astype(np.int64)
    raise ValueError(f"{name}.{kind} is not a kind of rows; allowed: {list(ROW_KINDS)}")


def row_count(kind: str, array: np.ndarray) -> int:
    """How many rows an encoded rows array names (without decoding a mask)."""
    if kind == "mask":
        return int(np.unpackbits(np.asarray(array, dtype=np.uint8)).sum())
    return int(np.asarray(array).shape[0])


def text_digest(text: str) -> str:
    """A document's digest: the first 32 hex digits of its SHA-256 (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def array_digest(kind: str, dtype: str, shape: tuple[int, ...], data: bytes) -> str:
    """An encoded rows array's digest: kind, dtype, shape and bytes (SHA-256, 32 hex digits)."""
    head = f"{kind}|{dtype}|{tuple(int(n) for n in shape)}|".encode()
    return hashlib.sha256(head + bytes(data)).hexdigest()[:32]


def rows_to_inputs(rows: np.ndarray, public_x: torch.Tensor, name: str = "rows") -> torch.Tensor:
    """Integer `rows` pick rows of the public set; float `rows` are (synthetic) inputs themselves.

    Raises ValueError for indices outside the public set or inputs of another shape.
    """
    if np.issubdtype(rows.dtype, np.integer):
        idx = rows.astype(np.int64)
        if idx.ndim != 1:
            raise ValueError(f"{name}.indices must be one-dimensional, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(public_x)):
            raise ValueError(f"{name}.indices reach outside the public set of {len(public_x)} rows")
        return public_x[torch.from_numpy(idx)]
    inputs = rows.astype(np.float32)
    if inputs.shape[1:] != tuple(public_x.shape[1:]):
        raise ValueError(
            f"{name}.inputs have shape {inputs.shape[1:]}, the data has {tuple(public_x.shape[1:])}"
        )
    return torch.from_numpy(inputs)


def query_directions(seed: int, directions: int, shape: tuple[int, ...]) -> np.ndarray:
    """The Q standard-normal directions ``[Q, *shape]`` that `seed` names (float32).

    Server and client draw them alike, so only the seed travels, not Q copies of the inputs."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((directions, *shape), dtype=np.float32)


MAX_QUERY_DIRECTIONS = 1024
"""Most perturbations a client computes per queried input."""
MAX_QUERY_VALUES = 1 << 26
"""Most input values (float32) a client expands one query into (256 MiB)."""


def expand_query(inputs: np.ndarray, seed: int, directions: int, mu: float) -> np.ndarray:
    """``[x, x + mu * u_1, ..., x + mu * u_Q]`` stacked along rows: ``[(1 + Q) * N, ...]``."""
    x = np.asarray(inputs, dtype=np.float32)
    if not 0 <= directions <= MAX_QUERY_DIRECTIONS or not np.isfinite(mu):
        raise ValueError(f"query-directions must be in 0..{MAX_QUERY_DIRECTIONS} and query-mu "
                         f"finite, got {directions}, {mu}")
    if (1 + directions) * x.size > MAX_QUERY_VALUES:
        raise ValueError(f"a query of {(1 + directions) * x.size:,} values exceeds "
                         f"{MAX_QUERY_VALUES:,}")
    u = query_directions(seed, directions, x.shape)
    return np.concatenate([x[None], x[None] + np.float32(mu) * u]).reshape(-1, *x.shape[1:])
