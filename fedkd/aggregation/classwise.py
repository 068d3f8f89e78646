"""Aggregators that weigh each teacher per class by how much of that class it trained on.

Under label skew a teacher is an expert on the classes it holds and guesses on the others. With
``n[k, c]`` the private rows of class ``c`` of teacher ``k`` (``meta.class_counts``, sent by the
clients when ``distill.share_class_counts`` is on), these aggregators let the holders of a class
speak for it.
"""

from __future__ import annotations

import logging

import numpy as np

from fedkd.aggregation.core import TeacherMeta, as_soft_targets, check_logits, softmax

log = logging.getLogger(__name__)


def class_counts_of(meta: TeacherMeta | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``meta.class_counts`` as float64 ``[K, C]`` for logits of `shape` ``[K, N, C]``, checked;
    None when the teachers sent none."""
    if meta is None or meta.class_counts is None:
        return None
    counts = np.asarray(meta.class_counts, dtype=np.float64)
    if counts.shape != (shape[0], shape[2]):
        raise ValueError(f"class counts {counts.shape} must be [K={shape[0]}, C={shape[2]}]")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("class counts must be finite and >= 0")
    return counts


def class_weighted(logits: np.ndarray, meta: TeacherMeta | None = None, *,
                   temperature: float = 1.0) -> np.ndarray:
    """Column ``c`` is the mean of ``p_k[c]`` weighted by ``n[k, c]``; rows renormalised.

    ``q[c] ∝ sum_k n[k, c] p_k[c] / sum_k n[k, c]`` with ``p_k = softmax(logits_k / T)``. A class
    no teacher holds gets the plain mean of ``p_k[c]``. Without class counts (a strategy whose
    clients send none, such as FedDF, whose teachers are uploaded models) every class is weighted
    by the teachers' data sizes (`weighted`), with a warning.
    """
    array = check_logits(logits, meta)
    counts = class_counts_of(meta, array.shape)
    if counts is None:
        log.warning("class_weighted: the teachers sent no class counts; weighting them by data "
                    "size instead")
        sizes = np.ones(array.shape[0]) if meta is None else np.asarray(meta.num_examples, float)
        counts = np.repeat(sizes[:, None], array.shape[2], axis=1)
    held = counts.sum(axis=0) > 0
    weights = np.where(held, counts, 1.0)  # [K, C]
    probs = softmax(array, temperature)  # [K, N, C]
    q = (weights[:, None, :] * probs).sum(axis=0) / weights.sum(axis=0)
    return as_soft_targets(q)
