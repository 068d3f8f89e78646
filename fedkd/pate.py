"""PATE's Renyi-DP analysis of GNMax and Confident GNMax (Papernot et al. 2018, "Scalable Private Learning
with PATE", ICLR), as small pure functions.

A query releases ``argmax_c (n_c + N(0, sigma^2))`` for the vote histogram ``n`` of one transfer row. Its RDP
at order ``lambda`` is at most ``lambda / sigma^2`` whatever the votes (the data-independent bound, Prop. 8), and
much less when the plurality is clear: with ``q`` an upper bound on the probability that the noisy answer is not
the plurality (Prop. 7), Theorem 6 bounds the RDP by a function of ``q`` (`rdp_gnmax`).

Confident GNMax first checks ``max_c n_c + N(0, sigma1^2) >= T`` and answers (with noise ``sigma2``) only the
rows that pass. The check is a Gaussian mechanism on ``max_c n_c``, which one teacher moves by at most 1
(sensitivity 1 where GNMax's vector has 2 coordinates moved by 1, hence ``sqrt(2) * sigma1`` below), and its
outcome is binary, so the same Theorem 6 bounds it from ``Pr[answered]`` (`rdp_threshold`). Every row pays for
the check; answered rows also pay for the answer.

The per-order RDP of all queries composes by addition; (epsilon, delta) comes from dp_accounting's conversion
(`epsilon_from_rdp`), on dp_accounting's default orders.

What the data-dependent epsilon means: it is a function of the private votes, so publishing it is itself a
release. The paper publishes it after a smooth-sensitivity analysis (not implemented here); without it the
data-dependent number is what a data curator may look at, and the data-independent bound is the one a
guarantee may quote. Both are reported.
"""

from __future__ import annotations

import math

import numpy as np

SQRT2 = math.sqrt(2.0)


def rdp_orders() -> np.ndarray:
    """dp_accounting's default RDP orders (``1.1 .. 10.9, 11 .. 63, 128 .. 1024``), as float64."""
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    return np.array(DEFAULT_RDP_ORDERS, dtype=np.float64)


def _log1mexp(x: float) -> float:
    """``log(1 - exp(x))`` for ``x <= 0``, without cancellation."""
    if x > 0:
        raise ValueError(f"log1mexp needs x <= 0, got {x}")
    if x == 0:
        return -math.inf
    return math.log1p(-math.exp(x)) if x < -1 else math.log(-math.expm1(x))


def _check_orders(orders: np.ndarray) -> np.ndarray:
    orders = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if (orders <= 1).any():
        raise ValueError("RDP orders must be > 1")
    return orders


def log_q_gnmax(counts: np.ndarray, sigma: float) -> float:
    """Upper bound on ``ln Pr[GNMax answer != plurality]`` for one vote histogram (Prop. 7).

    Union bound over the other classes: ``Pr[n_j + Z_j >= n_max + Z_max] = Pr[N(0, 2 sigma^2) >= n_max - n_j]``,
    capped at ``ln(1 - 1/C)`` (no class is less likely than uniform noise makes it).

    Parameters
    ----------
    counts : np.ndarray
        ``[C]`` votes per class (C >= 2).
    sigma : float
        Std of the Gaussian noise on each count (> 0).
    """
    counts = np.asarray(counts, dtype=np.float64)
    top = int(np.argmax(counts))
    gaps = np.delete(counts[top] - counts, top)
    from scipy.special import log_ndtr  # here: scipy.special costs every ClientApp 0.25 s

    log_terms = log_ndtr(-gaps / (SQRT2 * sigma))  # log survival function of N(0, 2 sigma^2) at each gap
    return float(min(np.logaddexp.reduce(log_terms), math.log(1.0 - 1.0 / counts.size)))


def rdp_gnmax_data_independent(sigma: float, orders: np.ndarray) -> np.ndarray:
    """``lambda / sigma^2`` at every order: GNMax's RDP whatever the votes (Prop. 8)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return _check_orders(orders) / sigma**2


def rdp_gnmax(log_q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """Data-dependent RDP of GNMax from ``log_q`` (Theorem 6 with the orders of Prop. 10).

    Where the bound does not apply (its conditions on ``q`` fail, or an order is above ``mu1``) the
    data-independent ``lambda / sigma^2`` is kept; the result is never above it.

    Parameters
    ----------
    log_q : float
        ``ln`` of an upper bound on the probability of a non-plurality answer (<= 0), e.g. `log_q_gnmax`.
    sigma : float
        Std of the Gaussian noise (> 0).
    orders : np.ndarray
        RDP orders (> 1).
    """
    if log_q > 0:
        raise ValueError(f"log_q must be <= 0, got {log_q}")
    bound = rdp_gnmax_data_independent(sigma, orders)
    orders = _check_orders(orders)
    if math.isinf(log_q):  # the answer is fixed: no privacy spent
        return np.zeros_like(bound)
    variance = sigma**2
    mu2 = math.sqrt(variance * -log_q)
    mu1 = mu2 + 1.0
    applies = (orders < mu1) & (mu2 > 1.0)
    if not applies.any():
        return bound
    eps1, eps2 = mu1 / variance, mu2 / variance
    q_small_enough = log_q <= (mu2 - 1.0) * eps2 - mu2 * (
        math.log1p(1.0 / (mu1 - 1.0)) + math.log1p(1.0 / (mu2 - 1.0)))
    if not (q_small_enough and -log_q > eps2):
        return bound
    log_1mq = _log1mexp(log_q)
    log_a = (orders - 1.0) * (log_1mq - _log1mexp((log_q + eps2) * (1.0 - 1.0 / mu2)))
    log_b = (orders - 1.0) * (eps1 - log_q / (mu1 - 1.0))
    dependent = np.logaddexp(log_1mq + log_a, log_q + log_b) / (orders - 1.0)
    return np.where(applies, np.minimum(bound, dependent), bound)


def log_pr_answered(threshold: float, sigma1: float, counts: np.ndarray) -> float:
    """``ln Pr[max_c n_c + N(0, sigma1^2) >= T]``: the chance that a row passes the confidence check."""
    from scipy.special import log_ndtr

    return float(log_ndtr((round(float(np.max(counts))) - threshold) / sigma1))


def rdp_threshold_data_independent(sigma1: float, orders: np.ndarray) -> np.ndarray:
    """RDP of the confidence check whatever the votes: ``lambda / (2 sigma1^2)`` (sensitivity 1)."""
    return rdp_gnmax_data_independent(SQRT2 * sigma1, orders)


def rdp_threshold(log_pr: float, sigma1: float, orders: np.ndarray) -> np.ndarray:
    """Data-dependent RDP of the confidence check from ``ln Pr[answered]`` (Theorem 6 on a binary outcome:
    ``q`` is the less likely of answered and not answered)."""
    log_q = min(log_pr, _log1mexp(log_pr))
    return rdp_gnmax(log_q, SQRT2 * sigma1, orders)


def confident_gnmax_rdp(counts: np.ndarray, answered: np.ndarray, threshold: float, sigma1: float,
                        sigma2: float, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-order RDP of one batch of Confident GNMax queries: ``(data-dependent, data-independent)``.

    Every row pays for the check; the answered rows also pay for GNMax with ``sigma2``.

    Parameters
    ----------
    counts : np.ndarray
        ``[N, C]`` vote histograms.
    answered : np.ndarray
        ``[N]`` bool: which rows passed the check (and were answered).
    threshold, sigma1, sigma2 : float
        The check's threshold T and noise std, and the answer's noise std.
    orders : np.ndarray
        RDP orders (> 1).
    """
    counts = np.asarray(counts, dtype=np.float64)
    answered = np.asarray(answered, dtype=bool)
    if counts.ndim != 2 or answered.shape != counts.shape[:1]:
        raise ValueError(f"counts {counts.shape} must be [N, C] and answered {answered.shape} [N]")
    orders = _check_orders(orders)
    dependent = np.zeros_like(orders)
    for row, passed in zip(counts, answered):
        dependent += rdp_threshold(log_pr_answered(threshold, sigma1, row), sigma1, orders)
        if passed:
            dependent += rdp_gnmax(log_q_gnmax(row, sigma2), sigma2, orders)
    independent = (len(counts) * rdp_threshold_data_independent(sigma1, orders)
                   + int(answered.sum()) * rdp_gnmax_data_independent(sigma2, orders))
    return dependent, independent


def epsilon_from_rdp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of a composed per-order RDP curve, by dp_accounting's conversion
    (``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon``, the one its RdpAccountant uses)."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not np.any(rdp):
        return 0.0
    epsilon, _ = compute_epsilon(np.asarray(orders, dtype=np.float64), np.asarray(rdp, dtype=np.float64), delta)
    return float(epsilon)
