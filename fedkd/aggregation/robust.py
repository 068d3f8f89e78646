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


def weiszfeld(points: np.ndarray, weights: np.ndarray | None = None, *, iters: int = 100,
              tol: float = 1e-9, eps: float = 1e-12) -> np.ndarray:
    """Per-sample geometric median of `points` ``[K, N, D]``: ``argmin_z sum_k w_k ||x_k - z||``.

    Smoothed Weiszfeld iterations (as in RFA, Pillutla et al. 2022, IEEE TSP), vectorised over
    the N samples: ``z <- sum_k b_k x_k / sum_k b_k`` with ``b_k = w_k / max(eps, ||x_k - z||)``,
    from the weighted mean. A sample stops once its step moves it no more than `tol` (at most
    `iters` steps), so each sample's median is the one it would get alone, and the iterations
    left run on the samples still moving only. Fewer than half the total weight cannot move the
    result arbitrarily far (breakdown 1/2).

    Parameters
    ----------
    weights : np.ndarray or None
        ``[K]`` non-negative weights (equal without).

    Returns
    -------
    np.ndarray
        ``[N, D]`` float64; a convex combination of the points, sample by sample.
    """
    x = np.asarray(points, dtype=np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != x.shape[:1] or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {w.shape} must be [K={x.shape[0]}], finite, >= 0, not all 0")
    moving_x = np.ascontiguousarray(x.transpose(1, 0, 2))  # [N, K, D]: a sample's points together
    z = np.einsum("k,nkd->nd", w, moving_x) / w.sum()
    active, moving_z = np.arange(len(moving_x)), z
    for _ in range(iters):
        diff = moving_x - moving_z[:, None, :]
        beta = w / np.maximum(np.sqrt(np.einsum("nkd,nkd->nk", diff, diff)), eps)  # [A, K]
        new = np.einsum("nk,nkd->nd", beta, moving_x) / beta.sum(axis=1)[:, None]
        moving = np.abs(new - moving_z).max(axis=1) > tol
        z[active] = new
        if not moving.all():
            active, moving_x, new = active[moving], moving_x[moving], new[moving]
        if not len(active):
            break
        moving_z = new
    return z


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``0.5 * sum_c |p - q|`` over the last axis (0: equal, 1: disjoint supports)."""
    return 0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum(-1)


def geometric_median(logits: np.ndarray, meta: TeacherMeta | None = None, *,
                     temperature: float = 1.0, iters: int = 100) -> np.ndarray:
    """Per sample, the geometric median of the teachers' ``softmax(logits / T)`` (`weiszfeld`).

    The robust aggregator of RFA (Pillutla et al. 2022) applied to soft labels: each teacher is
    a point of the probability simplex, so one teacher moves the result by a bounded amount
    however confident or large its logits, and fewer than half of them cannot take it over.
    """
    iters = int(check_number("iters", iters, low=1.0, low_open=False))
    array = check_logits(logits, meta)
    return as_soft_targets(np.clip(weiszfeld(softmax(array, temperature), iters=iters), 0.0, None))


def anomaly_scores(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``[K]`` each teacher's mean total-variation distance (in [0, 1]) between its
    ``softmax(logits / T)`` and the per-sample geometric median of all teachers' (the robust
    consensus): near 0 for a teacher that agrees, near 1 for one confidently elsewhere."""
    probs = softmax(check_logits(logits), temperature)
    return total_variation(probs, weiszfeld(probs)).mean(axis=1)
