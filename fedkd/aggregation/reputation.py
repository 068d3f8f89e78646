"""Teacher reputation: distrust teachers that keep disagreeing with the robust consensus.

Reputation systems against Byzantine clients weigh each one by its record of agreement with the
majority over rounds (e.g. Xu and Lyu 2021, "A reputation mechanism is all you need"; the
consensus here is RFA's geometric median, Pillutla et al. 2022). For soft labels:

1. ``p_k = softmax(logits_k / T)``; the consensus ``g`` is their per-sample geometric median;
2. teacher k's score is its mean total-variation distance to ``g`` (`anomaly_scores`);
3. its reputation is the running mean ``r_k <- decay * r_k + (1 - decay) * score_k`` (its first
   score when new), kept per partition id from round to round;
4. a teacher is excluded when ``r_k > median(r) + threshold * max(1.4826 * MAD(r), floor)``
   (`outliers`), and the soft targets are the mean of the others' ``p_k``.

The defaults (threshold 2, floor 0.02) were chosen from the anomaly scores of the seed 0 and 1
robustness sweep (docs/robustness.md): with 3 and 0.05, two colluding label-flipping teachers of
ten (reputation about 0.2 against 0.04-0.11 for honest ones) stayed under the cut.

Honest teachers on non-IID data disagree too, but far less and not every round; an attacker that
sends confident wrong, random or flipped labels is far from the consensus every round.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedkd.aggregation.core import TeacherMeta, as_soft_targets, check_logits, check_number, softmax
from fedkd.aggregation.robust import total_variation, weiszfeld

MAD_TO_SIGMA = 1.4826
"""MAD times this estimates a normal distribution's standard deviation."""


def outliers(scores: np.ndarray, threshold: float, floor: float) -> np.ndarray:
    """``[K]`` bool: scores above ``median + threshold * max(1.4826 * MAD, floor)``.

    `floor` keeps teachers that agree closely from being cut for tiny differences; at least one
    teacher (the lowest score) is never an outlier.
    """
    s = np.asarray(scores, dtype=np.float64)
    centre = float(np.median(s))
    spread = max(MAD_TO_SIGMA * float(np.median(np.abs(s - centre))), floor)
    return s > centre + threshold * spread


class Reputation:
    """Mean of the probabilities of the teachers whose reputation is not an outlier.

    A stateful aggregator (Hydra instantiates it once per run, without ``_partial_``): the
    reputations live in the instance that the strategy holds, keyed by partition id, and
    depend only on the logits seen so far, so a rerun repeats them. `state_dict` and
    `load_state_dict` save and restore them.

    Parameters
    ----------
    decay : float
        Weight of the past in the running reputation, in [0, 1); 0 judges each round alone.
    threshold : float
        Robust z-score above which a teacher is excluded (> 0).
    floor : float
        Smallest spread of the reputations the threshold is applied to, in [0, 1].
    iters : int
        Weiszfeld iterations for the consensus.
    """

    def __init__(self, decay: float = 0.5, threshold: float = 2.0, floor: float = 0.02,
                 iters: int = 100) -> None:
        self.decay = check_number("decay", decay, low=0.0, high=1.0, low_open=False)
        self.threshold = check_number("threshold", threshold, low=0.0)
        self.floor = check_number("floor", floor, low=0.0, high=1.0, low_open=False,
                                  high_open=False)
        self.iters = int(check_number("iters", iters, low=1.0, low_open=False))
        self.reputation: dict[int, float] = {}
        self._excluded: list[int] = []

    def __call__(self, logits: np.ndarray, meta: TeacherMeta | None = None, *,
                 temperature: float = 1.0) -> np.ndarray:
        """Soft targets ``[N, C]``; updates the reputation of every teacher in `meta`."""
        array = check_logits(logits, meta)
        pids = (np.arange(array.shape[0]) if meta is None else meta.partition_ids).tolist()
        probs = softmax(array, temperature)
        scores = total_variation(probs, weiszfeld(probs, iters=self.iters)).mean(axis=1)
        for pid, score in zip(pids, scores):
            old = self.reputation.get(int(pid))
            self.reputation[int(pid)] = float(score if old is None else
                                              self.decay * old + (1 - self.decay) * score)
        current = np.array([self.reputation[int(p)] for p in pids])
        excluded = outliers(current, self.threshold, self.floor)
        self._excluded = sorted(int(p) for p, out in zip(pids, excluded) if out)
        return as_soft_targets(probs[~excluded].mean(axis=0))

    def report(self) -> dict[str, float]:
        """``excluded-teachers``: how many teachers the last call left out."""
        return {"excluded-teachers": float(len(self._excluded))}

    def state_dict(self) -> dict[str, Any]:
        """The reputations (partition id -> running score), for a checkpoint."""
        return {"reputation": {str(k): v for k, v in self.reputation.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.reputation = {int(k): float(v) for k, v in state["reputation"].items()}

    def __repr__(self) -> str:
        return (f"Reputation(decay={self.decay:g}, threshold={self.threshold:g}, "
                f"floor={self.floor:g})")
