"""Aggregators: teachers' logits ``[K, N, C]`` (+ metadata) -> soft targets ``[N, C]``.

Every aggregator has the same signature, so Hydra can select one (``conf/aggregator/*.yaml`` with
``_partial_: true``) and the server calls it as ``aggregator(logits, meta, temperature=T)``::

    def aggregator(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0) -> np.ndarray

The result is float32 probabilities at temperature T whose rows sum to 1. Logits come from clients and are
untrusted: shapes and finiteness are checked before any arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np

from fedkd.errors import ConfigError


@dataclass(frozen=True, eq=False)
class TeacherMeta:
    """What the server knows about the K teachers, in the order of the logits' first axis.

    Parameters
    ----------
    num_examples : np.ndarray
        ``[K]`` private training examples of each teacher.
    partition_ids : np.ndarray
        ``[K]`` partition id of each teacher (used in error messages and by per-client aggregators).
    class_counts : np.ndarray or None
        ``[K, C]`` private examples per class of each teacher, when clients report them.
    """

    num_examples: np.ndarray
    partition_ids: np.ndarray
    class_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        fields = {"num_examples": self.num_examples, "partition_ids": self.partition_ids}
        if self.class_counts is not None:
            fields["class_counts"] = self.class_counts
        for name, value in fields.items():
            array = np.array(value)  # a read-only copy: callers cannot change a frozen meta behind our back
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        k = self.num_examples.shape
        if self.num_examples.ndim != 1 or self.partition_ids.shape != k:
            raise ValueError(
                f"TeacherMeta: num_examples {self.num_examples.shape} and partition_ids "
                f"{self.partition_ids.shape} must both be [K]"
            )
        if self.class_counts is not None and (self.class_counts.ndim != 2 or self.class_counts.shape[0] != k[0]):
            raise ValueError(f"TeacherMeta: class_counts {self.class_counts.shape} must be [K={k[0]}, C]")

    def __len__(self) -> int:
        return len(self.num_examples)


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise ConfigError unless it is finite and > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature):
        raise ConfigError(f"temperature={temperature!r} must be a finite number > 0")
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature!r} must be > 0")
    return float(temperature)


def _teacher_name(k: int, meta: TeacherMeta | None) -> str:
    if meta is not None and len(meta) > k:
        return f"teacher {k} (partition {meta.partition_ids[k]})"
    return f"teacher {k}"


def check_logits(logits: np.ndarray, meta: TeacherMeta | None = None) -> np.ndarray:
    """Validate teachers' logits and return them as float64 ``[K, N, C]``.

    Raises
    ------
    ValueError
        Not a real-valued ``[K, N, C]`` array with K, N, C >= 1, a ``meta`` of another length than K, or a
        teacher with NaN or infinite values (the message names the teacher index).
    """
    array = np.asarray(logits)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"logits must be real numbers, got dtype {array.dtype}")
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"logits must be [K teachers, N samples, C classes] with K, N, C >= 1, got {array.shape}")
    if meta is not None and len(meta) != array.shape[0]:
        raise ValueError(f"meta describes {len(meta)} teachers but logits hold {array.shape[0]}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"{_teacher_name(int(bad[0]), meta)} sent non-finite logits (NaN or inf)")
    return array.astype(np.float64)


def softmax(x: np.ndarray, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    """Numerically stable ``softmax(x / temperature)`` along ``axis``, in float64."""
    z = np.asarray(x, dtype=np.float64) / check_temperature(temperature)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def as_soft_targets(probs: np.ndarray) -> np.ndarray:
    """Renormalize ``[N, C]`` probabilities and cast them to float32: the aggregators' output format."""
    probs = np.asarray(probs, dtype=np.float64)
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def weighted_mean_probs(logits: np.ndarray, weights: np.ndarray, temperature: float) -> np.ndarray:
    """``sum_k w_k softmax(logits_k / T) / sum_k w_k`` for weights ``[K]`` (or per sample ``[K, N]``), >= 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape not in (logits.shape[:1], logits.shape[:2]) or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"teacher weights {w.shape} must be finite, >= 0 and shaped [K] or [K, N]")
    w = np.broadcast_to(w.reshape(w.shape + (1,) * (3 - w.ndim)), logits.shape[:2] + (1,))
    total = w.sum(axis=0)
    if (total <= 0).any():
        raise ValueError("teacher weights sum to 0 for some sample; at least one teacher needs a positive weight")
    return as_soft_targets((w * softmax(logits, temperature)).sum(axis=0) / total)


def mean_logits(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0) -> np.ndarray:
    """``softmax(mean_k logits_k / T)``: average the teachers' logits, then soften."""
    array = check_logits(logits, meta)
    return as_soft_targets(softmax(array.mean(axis=0), temperature))


def mean_probs(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0) -> np.ndarray:
    """``mean_k softmax(logits_k / T)``: soften each teacher, then average the probabilities."""
    array = check_logits(logits, meta)
    return weighted_mean_probs(array, np.ones(array.shape[0]), temperature)


def weighted(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0) -> np.ndarray:
    """Mean of ``softmax(logits_k / T)`` weighted by ``meta.num_examples`` (data-size weighting).

    Raises
    ------
    ConfigError
        ``meta`` is missing: this aggregator needs each teacher's number of examples.
    """
    if meta is None:
        raise ConfigError("aggregator 'weighted' needs meta (TeacherMeta with num_examples); got meta=None")
    array = check_logits(logits, meta)
    return weighted_mean_probs(array, meta.num_examples, temperature)
