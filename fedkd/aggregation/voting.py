"""Voting aggregators: each teacher votes for its argmax class; the soft target is a one-hot label.

Votes do not depend on the temperature (it is still validated, as the contract requires).
"""

from __future__ import annotations

import numpy as np

from fedkd.aggregation.core import TeacherMeta, as_soft_targets, check_logits, check_temperature, noise_rng
from fedkd.privacy import GNMaxAccountant


def vote_counts(logits: np.ndarray) -> np.ndarray:
    """``[N, C]`` number of teachers whose argmax is each class (a teacher's own ties go to the lowest class)."""
    k, n, c = logits.shape
    counts = np.zeros((n, c))
    np.add.at(counts, (np.broadcast_to(np.arange(n), (k, n)), logits.argmax(axis=-1)), 1.0)
    return counts


def one_hot_argmax(scores: np.ndarray) -> np.ndarray:
    """One-hot ``[N, C]`` float32 of each row's argmax (ties go to the lowest class)."""
    return as_soft_targets(np.eye(scores.shape[-1])[scores.argmax(axis=-1)])


def majority_vote(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0) -> np.ndarray:
    """One-hot of the plurality class of the teachers' argmax votes (ties -> lowest class index)."""
    check_temperature(temperature)
    return one_hot_argmax(vote_counts(check_logits(logits, meta)))


class NoisyVote:
    """PATE's GNMax: one-hot of ``argmax_c (votes_c + N(0, sigma^2))``, with the privacy it spends.

    Every transfer sample is one query; ``report()`` gives the (epsilon, delta) of all queries so far, accounted
    by ``fedkd.privacy.GNMaxAccountant``. The instance keeps that ledger, so build it once per run (Hydra without
    ``_partial_``). The noise comes from ``noise_rng(meta, queries_so_far)``: a rerun with the same seed repeats
    it, and two calls never share noise, even within a round.

    Parameters
    ----------
    sigma : float
        Standard deviation of the Gaussian noise added to each class's vote count (> 0). With K teachers the
        margin is at most K: sigma much above K / 4 drowns the vote.
    delta : float
        The delta at which epsilon is reported, in (0, 1).
    """

    def __init__(self, sigma: float = 1.0, delta: float = 1e-5) -> None:
        self.accountant = GNMaxAccountant(sigma, delta)
        self._epsilon_round = 0.0

    def __call__(self, logits: np.ndarray, meta: TeacherMeta | None = None, *,
                 temperature: float = 1.0) -> np.ndarray:
        """Noisy plurality labels ``[N, C]``; records N queries."""
        check_temperature(temperature)
        counts = vote_counts(check_logits(logits, meta))
        rng = noise_rng(meta, self.accountant.queries)
        noisy = counts + rng.normal(0.0, self.accountant.sigma, size=counts.shape)
        self._epsilon_round = self.accountant.spend(counts.shape[0])
        return one_hot_argmax(noisy)

    def state_dict(self) -> dict[str, object]:
        """The privacy ledger and the last call's epsilon (a run's checkpoint keeps them)."""
        return {"accountant": self.accountant.state_dict(), "epsilon_round": self._epsilon_round}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Inverse of `state_dict`."""
        self.accountant.load_state_dict(state["accountant"])
        self._epsilon_round = float(state["epsilon_round"])

    def report(self) -> dict[str, float]:
        """``epsilon`` (all queries so far), ``epsilon-round`` (the last call's queries alone), ``delta``, ``queries``."""
        return {
            "epsilon": self.accountant.epsilon,
            "epsilon-round": self._epsilon_round,
            "delta": self.accountant.delta,
            "queries": float(self.accountant.queries),
        }

    def __repr__(self) -> str:
        return f"NoisyVote(sigma={self.accountant.sigma:g}, delta={self.accountant.delta:g})"
