"""Averaging aggregators: (weighted) means of the teachers' logits or probabilities.

``p_k = softmax(logits_k / T)`` below is teacher k's tempered distribution, ``H`` the entropy in nats.
"""

from __future__ import annotations

import math

import numpy as np

from fedkd.aggregation.core import (
    TeacherMeta,
    as_soft_targets,
    check_logits,
    check_number,
    log_softmax,
    softmax,
    weighted_mean_probs,
)
from fedkd.errors import ConfigError


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


def entropy_weighted(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0) -> np.ndarray:
    """Per sample, mean of ``p_k`` weighted by ``log C - H(p_k)`` (confident teachers count more; EBKD).

    A sample on which every teacher is uniform (all weights 0, and always when C = 1) gets equal weights.
    """
    array = check_logits(logits, meta)
    log_p = log_softmax(array, temperature)
    entropy = -(np.exp(log_p) * log_p).sum(axis=-1)  # [K, N]; log_p is finite, so p = 0 adds 0
    weights = np.clip(math.log(array.shape[-1]) - entropy, 0.0, None)  # rounding can push H past log C
    weights[:, weights.sum(axis=0) <= 0] = 1.0
    return weighted_mean_probs(array, weights, temperature)


def confidence_weighted(logits: np.ndarray, meta: TeacherMeta | None = None, *,
                        temperature: float = 1.0) -> np.ndarray:
    """Per sample, mean of ``p_k`` weighted by teacher k's top probability ``max_c p_k[c]`` (>= 1/C > 0)."""
    array = check_logits(logits, meta)
    return weighted_mean_probs(array, softmax(array, temperature).max(axis=-1), temperature)


def era(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0,
        sharpen: float = 0.1) -> np.ndarray:
    """DS-FL entropy reduction aggregation: ``softmax(mean_k p_k / sharpen)``.

    This is the formula of Itahara et al. (2021, IEEE TMC; their temperature T = our ``sharpen``): a softmax
    applied to the averaged *probabilities*, not the power sharpening ``mean_p ** (1 / sharpen)`` renormalised
    (that is ``softmax(log(mean_p) / sharpen)``). Classes whose mean probabilities differ by d get odds
    ``exp(d / sharpen)``, so it sharpens only for ``sharpen`` well below 1 (the paper uses 0.1); ``sharpen=1``
    gives ``softmax(mean_p)``, which is flatter than ``mean_p``.

    Parameters
    ----------
    sharpen : float
        The ERA temperature, > 0.
    """
    sharpen = check_number("sharpen", sharpen, low=0.0)
    array = check_logits(logits, meta)
    mean_p = softmax(array, temperature).mean(axis=0)
    return as_soft_targets(softmax(mean_p, sharpen))
