"""Robust aggregators: coordinate-wise statistics of the logits that outlying teachers cannot drag far."""

from __future__ import annotations

import math

import numpy as np

from fedkd.aggregation.core import TeacherMeta, as_soft_targets, check_logits, check_number, softmax


def median(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0) -> np.ndarray:
    """``softmax(median_k logits_k / T)``, the median taken per sample and class (mean of the middle two for even K)."""
    array = check_logits(logits, meta)
    return as_soft_targets(softmax(np.median(array, axis=0), temperature))


def trimmed_mean(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0,
                 fraction: float = 0.2) -> np.ndarray:
    """Per sample and class, drop the ``floor(fraction * K)`` largest and smallest logits, mean the rest, softmax(/T).

    Parameters
    ----------
    fraction : float
        Share of teachers trimmed at each end, in [0, 0.5); 0 is ``mean_logits``.
    """
    fraction = check_number("fraction", fraction, low=0.0, high=0.5, low_open=False)
    array = check_logits(logits, meta)
    k = array.shape[0]
    cut = min(math.floor(fraction * k + 1e-9), (k - 1) // 2)  # 1e-9: 0.29 * 100 is 28.999...; keep one teacher
    kept = np.sort(array, axis=0)[cut:k - cut]
    return as_soft_targets(softmax(kept.mean(axis=0), temperature))
