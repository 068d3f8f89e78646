"""Checks of what a client sends back: a value in, the checked value out, or a `ReplyError`.

Flower-free (numpy only). The server runs them on every reply in one place,
`fedkd.reply_guard.ReplyGuard`, which `fedkd.wire.WireGrid` applies to each reply it pulls
before it sorts them, shows them to observers or hands them to a strategy; the strategies'
own per-request checks (`fedkd.records.reply_logits`, FD's class logits, FedDF's weights) call
the same functions. Every error names the field, as the record and key it came in, and says
what is allowed: ``metrics.partition-id=nan is not an int in 0..9``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedkd.protocol import (
    COMPUTE_S, DIGEST_LOSS, DP_DELTA, DP_EPSILON, DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE, DP_STEPS,
    METRICS, NUM_EXAMPLES, OWN_ACCURACY, PARTITION_ID, PHASES, TEST_ACCURACY, TEST_LOSS,
    TRAIN_LOSS, phase_key,
)

MAX_ABS_LOGIT = 1e4
"""Largest logit magnitude a reply may carry. A softmax saturates long before (``exp(-50)`` is
below float32's resolution next to 1), so an honest model never comes near; a larger value is an
attack on mean-of-logits aggregation (one client out-shouting the others) or a broken client."""
MAX_EXAMPLES = 10**9
"""Cap on ``num-examples`` and class counts where the server does not know a partition's size
(a deployment: each node brings its own data). In a simulation the cap is the partition's
size (``data.client_sizes``; the test set's size, ``data.num_test``, for evaluation replies)."""
LOSS_ROUNDING = 1e-4
"""How far below 0 a reported loss may be (a KL divergence of equal distributions can round to
a tiny negative number)."""

METRIC_RANGES: dict[str, tuple[float, float]] = {
    TRAIN_LOSS: (-LOSS_ROUNDING, math.inf),
    DIGEST_LOSS: (-LOSS_ROUNDING, math.inf),
    TEST_LOSS: (-LOSS_ROUNDING, math.inf),
    TEST_ACCURACY: (0.0, 1.0),
    OWN_ACCURACY: (0.0, 1.0),
    COMPUTE_S: (0.0, math.inf),
    **{phase_key(p): (0.0, math.inf) for p in PHASES},
    DP_EPSILON: (0.0, math.inf),
    DP_DELTA: (0.0, 1.0),
    DP_NOISE_MULTIPLIER: (0.0, math.inf),
    DP_SAMPLE_RATE: (0.0, 1.0),
    DP_STEPS: (0.0, math.inf),
}
"""Closed range of every reported (never aggregated) metric; each must also be finite."""


class ReplyError(ValueError):
    """A reply field the server must not use; the message names the field and what is allowed."""


def show(value: object, limit: int = 40) -> str:
    """A short form of a received value for a message (``nan``, ``inf``, a cut-off list)."""
    text = repr(value) if not isinstance(value, float) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: object) -> bool:
    """Whether `value` is an integer, not a bool (Python's or NumPy's)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_number(value: object) -> bool:
    """Whether `value` is a real number (int or float), not a bool."""
    return is_int(value) or isinstance(value, float | np.floating)


def partition_id(value: object, num_partitions: int,
                 field: str = f"{METRICS}.{PARTITION_ID}") -> int:
    """A partition id: an int in ``0..num_partitions - 1``."""
    if not is_int(value) or not 0 <= value < num_partitions:
        raise ReplyError(f"{field}={show(value)} is not an int in 0..{num_partitions - 1}")
    return int(value)


def count(value: object, cap: int, field: str = f"{METRICS}.{NUM_EXAMPLES}") -> int:
    """A number of examples: an int in ``0..cap``."""
    if not is_int(value) or not 0 <= value <= cap:
        raise ReplyError(f"{field}={show(value)} is not an int in 0..{cap}")
    return int(value)


def number(value: object, field: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite real number in ``[low, high]``."""
    if not is_number(value) or not math.isfinite(value) or not low <= value <= high:
        bounds = f" in [{low:g}, {high:g}]" if (low, high) != (-math.inf, math.inf) else ""
        raise ReplyError(f"{field}={show(value)} is not a finite number{bounds}")
    return float(value)


def metric(key: str, value: object) -> float:
    """A reported metric (a loss, an accuracy, seconds), checked against `METRIC_RANGES`."""
    if key not in METRIC_RANGES:
        raise ReplyError(f"{METRICS}.{key} is not a metric fedkd reads")
    low, high = METRIC_RANGES[key]
    return number(value, f"{METRICS}.{key}", low, high)


def example_cap(data: Mapping, partition: int, evaluation: bool = False) -> int:
    """Most examples partition `partition` can report: its size in a simulation (the test set's
    for an evaluation reply), `MAX_EXAMPLES` where the nodes bring their own data.

    Parameters
    ----------
    data : mapping
        The run's data facts (`fedkd.settings.ClientSettings.data`).
    partition : int
        A checked partition id.
    evaluation : bool
        Whether the count is of test rows (an ``evaluate`` reply).
    """
    sizes = data.get("client_sizes") or ()
    if not 0 <= partition < len(sizes):
        return MAX_EXAMPLES
    return int(data["num_test"]) if evaluation else int(sizes[partition])


def _array(array: object, field: str, shape: Sequence[int] | None) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise ReplyError(f"{field} is not an array")
    if shape is not None and array.shape != tuple(shape):
        raise ReplyError(f"{field} has shape {array.shape}, expected {tuple(shape)}")
    return array


def logits(array: object, shape: Sequence[int], field: str) -> np.ndarray:
    """Logits: floating point, of `shape`, finite, ``|x| <= MAX_ABS_LOGIT``; as float32."""
    array = _array(array, field, shape)
    if array.dtype.kind != "f":
        raise ReplyError(f"{field} has dtype {array.dtype}, expected floating point")
    if not np.isfinite(array).all():
        raise ReplyError(f"{field} holds NaN or inf")
    if array.size and (peak := float(np.abs(array).max())) > MAX_ABS_LOGIT:
        raise ReplyError(f"{field} holds |value| {peak:.3g} > {MAX_ABS_LOGIT:.3g}")
    return array.astype(np.float32)


def relation(array: object, rows: int, field: str, width: int | None = None) -> np.ndarray:
    """Cosine similarities [rows, width] (default rows - 1): floating point, finite, within
    [-1, 1] (1e-3); as float32."""
    array = _array(array, field, (rows, max(rows - 1, 0) if width is None else width))
    if array.dtype.kind != "f":
        raise ReplyError(f"{field} has dtype {array.dtype}, expected floating point")
    if not np.isfinite(array).all():
        raise ReplyError(f"{field} holds NaN or inf")
    if array.size and (peak := float(np.abs(array).max())) > 1.0 + 1e-3:
        raise ReplyError(f"{field} holds |value| {peak:.3g} > 1: not cosine similarities")
    return array.astype(np.float32)


def relation_index(array: object, shape: Sequence[int], field: str) -> np.ndarray:
    """Columns of a top-k relation ``[R, k]`` in the ``[R, R - 1]`` layout: integers in
    ``[0, R - 1)``, no column twice in a row; as int64."""
    array = _array(array, field, shape)
    if array.dtype.kind not in "iu":
        raise ReplyError(f"{field} has dtype {array.dtype}, expected integers")
    width = max(int(shape[0]) - 1, 0)
    if array.size and (int(array.min()) < 0 or int(array.max()) >= width):
        raise ReplyError(f"{field} holds a column outside [0, {width})")
    ordered = np.sort(array.astype(np.int64), axis=1)
    if array.size and (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ReplyError(f"{field} names a column twice in a row")
    return array.astype(np.int64)


def class_counts(array: object, num_classes: int, cap: int, field: str) -> np.ndarray:
    """Rows per class: [num_classes] whole numbers >= 0 that sum to at most `cap`; as int64."""
    array = _array(array, field, (num_classes,))
    if array.dtype.kind not in "iuf":
        raise ReplyError(f"{field} has dtype {array.dtype}, expected numbers")
    values = array.astype(np.float64)
    if not np.isfinite(values).all() or (values < 0).any() or (values != np.rint(values)).any():
        raise ReplyError(f"{field} are not whole numbers >= 0")
    if values.sum() > cap:
        raise ReplyError(f"{field} sum to {values.sum():.0f} > {cap}, more rows than the "
                         "partition holds")
    return values.astype(np.int64)


def weights(arrays: Mapping[str, np.ndarray], reference: Mapping[str, tuple[tuple[int, ...], bool]],
            field: str = "arrays") -> None:
    """Uploaded weights against an architecture: the same keys, each of the reference's shape,
    numeric (floating where the reference is), finite.

    Parameters
    ----------
    arrays : mapping
        State-dict key -> received array.
    reference : mapping
        State-dict key -> (shape, whether floating) of the architecture the partition runs.
    """
    if set(arrays) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
        raise ReplyError(f"{field} keys differ from the architecture's: missing {missing[:3]}, "
                         f"extra {extra[:3]}")
    for key, (shape, floating) in reference.items():
        array = _array(arrays[key], f"{field}.{key}", shape)
        if array.dtype.kind not in "biuf" or (floating and array.dtype.kind != "f"):
            raise ReplyError(f"{field}.{key} has dtype {array.dtype}, expected "
                             f"{'floating point' if floating else 'numbers'}")
        if not np.isfinite(array).all():
            raise ReplyError(f"{field}.{key} holds NaN or inf")
