"""Shared pieces of the aggregators: teacher metadata, input checks, softmax, weighted means.

Logits come from clients and are untrusted: shapes and finiteness are checked before any arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from fedkd.errors import require_number


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
    server_round : int
        The round these logits belong to (>= 0); with ``seed`` it keys the noise of stochastic aggregators.
    seed : int
        The run's seed (>= 0). Stochastic aggregators draw from ``noise_rng(meta)``, so reruns repeat.
    """

    num_examples: np.ndarray
    partition_ids: np.ndarray
    class_counts: np.ndarray | None = None
    server_round: int = 0
    seed: int = 0

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
        for name in ("server_round", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ValueError(f"TeacherMeta: {name}={value!r} must be an integer >= 0")
            object.__setattr__(self, name, int(value))

    def __len__(self) -> int:
        return len(self.num_examples)


def noise_rng(meta: TeacherMeta | None, *extra: int) -> np.random.Generator:
    """``np.random.default_rng([seed, server_round, *extra])`` from ``meta`` (seed 0, round 0 without one)."""
    seed, server_round = (0, 0) if meta is None else (meta.seed, meta.server_round)
    return np.random.default_rng([seed, server_round, *extra])


def check_number(name: str, value: float, *, low: float, high: float = math.inf,
                 low_open: bool = True, high_open: bool = True) -> float:
    """Return hyper-parameter ``value`` as a float, or raise ConfigError naming ``name`` and the allowed range.

    The range is ``(low, high)``; ``low_open=False`` / ``high_open=False`` include that end.
    """
    return require_number(name, value, low, None if math.isinf(high) else high,
                          low_open=low_open, high_open=high_open)


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise ConfigError unless it is finite and > 0."""
    return check_number("temperature", temperature, low=0.0)


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


def log_softmax(x: np.ndarray, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    """Numerically stable ``log softmax(x / temperature)`` along ``axis``, in float64 (finite everywhere)."""
    z = np.asarray(x, dtype=np.float64) / check_temperature(temperature)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


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
