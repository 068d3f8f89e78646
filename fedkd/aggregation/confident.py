"""Confident GNMax (PATE 2018): answer only the transfer rows whose plurality clears a noisy threshold.

A row is answered when ``max_c n_c + N(0, sigma_threshold^2) >= threshold`` (``n``: the teachers' argmax votes);
an answered row gets the one-hot of ``argmax_c (n_c + N(0, sigma^2))``, an unanswered one a row of NaN
(`UNANSWERED`): the strategy drops those rows from the round's transfer set (`answered_rows`), so students
never train on them. Both the check (every row) and the answers are accounted, data-dependently and
data-independently (`fedkd.pate`), and composed over the run.
"""

from __future__ import annotations

import numpy as np

from fedkd.aggregation.core import TeacherMeta, check_logits, check_number, check_temperature, noise_rng
from fedkd.aggregation.voting import one_hot_argmax, vote_counts
from fedkd import pate

UNANSWERED = np.nan
"""The value of every entry of a row an aggregator does not answer."""


def answered_rows(soft_targets: np.ndarray) -> np.ndarray:
    """``[N]`` bool: the rows of an aggregator's output that are answered (finite)."""
    return np.isfinite(np.asarray(soft_targets)).all(axis=-1)


class ConfidentVote:
    """Confident GNMax with its privacy ledger; build once per run (no ``_partial_``).

    Parameters
    ----------
    threshold : float
        T: a row is answered when its top vote count plus noise reaches it (> 0; with K teachers, about 0.6 K).
    sigma_threshold : float
        sigma1: std of the noise on the top count in the check (> 0).
    sigma : float
        sigma2: std of the noise on each class's count in the answer (> 0).
    delta : float
        The delta at which epsilon is reported, in (0, 1).
    """

    def __init__(self, threshold: float = 60.0, sigma_threshold: float = 30.0, sigma: float = 10.0,
                 delta: float = 1e-5) -> None:
        self.threshold = check_number("threshold", threshold, low=0.0)
        self.sigma_threshold = check_number("sigma_threshold", sigma_threshold, low=0.0)
        self.sigma = check_number("sigma", sigma, low=0.0)
        self.delta = check_number("delta", delta, low=0.0, high=1.0)
        self.orders = pate.rdp_orders()
        self._rdp_dependent = np.zeros_like(self.orders)
        self._rdp_independent = np.zeros_like(self.orders)
        self.queries = 0
        self.answered = 0
        self._answered_round = 0

    def __call__(self, logits: np.ndarray, meta: TeacherMeta | None = None, *,
                 temperature: float = 1.0) -> np.ndarray:
        """One-hot noisy labels ``[N, C]`` for the answered rows, NaN rows for the others; records N queries."""
        check_temperature(temperature)
        counts = vote_counts(check_logits(logits, meta))
        rng = noise_rng(meta, self.queries)
        passed = counts.max(axis=1) + rng.normal(0.0, self.sigma_threshold, size=len(counts)) >= self.threshold
        labels = one_hot_argmax(counts + rng.normal(0.0, self.sigma, size=counts.shape))
        dependent, independent = pate.confident_gnmax_rdp(counts, passed, self.threshold, self.sigma_threshold,
                                                          self.sigma, self.orders)
        self._rdp_dependent += dependent
        self._rdp_independent += independent
        self.queries += len(counts)
        self._answered_round = int(passed.sum())
        self.answered += self._answered_round
        return np.where(passed[:, None], labels, np.float32(UNANSWERED)).astype(np.float32)

    @property
    def epsilon(self) -> float:
        """Data-dependent epsilon at ``delta`` of every query so far (see `fedkd.pate` on what it means)."""
        return pate.epsilon_from_rdp(self.orders, self._rdp_dependent, self.delta)

    @property
    def epsilon_data_independent(self) -> float:
        """Epsilon at ``delta`` whatever the votes: the bound a guarantee may quote."""
        return pate.epsilon_from_rdp(self.orders, self._rdp_independent, self.delta)

    def report(self) -> dict[str, float]:
        """Privacy spent and its inputs: ``epsilon`` (data-dependent), ``epsilon-data-independent``, ``delta``,
        ``queries``, ``answered``, ``answered-round``, ``pate-threshold``, ``pate-sigma-threshold``, ``pate-sigma``."""
        return {
            "epsilon": self.epsilon,
            "epsilon-data-independent": self.epsilon_data_independent,
            "delta": self.delta,
            "queries": float(self.queries),
            "answered": float(self.answered),
            "answered-round": float(self._answered_round),
            "pate-threshold": self.threshold,
            "pate-sigma-threshold": self.sigma_threshold,
            "pate-sigma": self.sigma,
        }

    def state_dict(self) -> dict[str, object]:
        """The ledger: per-order RDP so far and the query counts (a run's checkpoint keeps them)."""
        return {"rdp_dependent": self._rdp_dependent.tolist(), "rdp_independent": self._rdp_independent.tolist(),
                "queries": self.queries, "answered": self.answered, "answered_round": self._answered_round}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Inverse of `state_dict`."""
        self._rdp_dependent = np.array(state["rdp_dependent"], dtype=np.float64)
        self._rdp_independent = np.array(state["rdp_independent"], dtype=np.float64)
        self.queries, self.answered = int(state["queries"]), int(state["answered"])
        self._answered_round = int(state["answered_round"])

    def __repr__(self) -> str:
        return (f"ConfidentVote(threshold={self.threshold:g}, sigma_threshold={self.sigma_threshold:g}, "
                f"sigma={self.sigma:g}, delta={self.delta:g})")
