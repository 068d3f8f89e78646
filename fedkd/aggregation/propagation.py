"""Soft targets smoothed along the ensemble's relations: label propagation on the transfer rows.

The relational strategy (`fedkd.strategies.relational`) aggregates, next to the soft targets,
each transfer row's distribution over its neighbours (``A``, rows summing to 1, zero diagonal):
how the ensemble of teachers sees the rows relative to each other. `propagate` mixes each row's
soft target with its neighbours' (Zhou et al. 2004, "Learning with local and global
consistency"): ``F <- (1 - w) P + w A F``, from ``F = P``, `steps` times. A row whose ensemble
answer is unsure or wrong is pulled toward what its nearest neighbours are, in the teachers' own
feature spaces; the result stays on the simplex (a convex combination of distributions).
"""

from __future__ import annotations

import numpy as np

from fedkd.aggregation.core import check_number


def propagate(probs: np.ndarray, relation: np.ndarray, weight: float, steps: int = 1) -> np.ndarray:
    """Smooth the first ``len(relation)`` rows of `probs` along `relation`.

    Parameters
    ----------
    probs : np.ndarray
        ``[N, C]`` soft targets (rows sum to 1).
    relation : np.ndarray
        ``[R, R]`` with ``R <= N``: row ``i`` a distribution over the other rows among the first
        ``R`` (zero diagonal); a row without mass (all 0) keeps its own target.
    weight : float
        ``w`` in ``[0, 1]``: 0 returns `probs` unchanged.
    steps : int
        Propagation steps (>= 1).

    Returns
    -------
    np.ndarray
        ``[N, C]`` float32; rows past ``R`` as given.
    """
    weight = check_number("strategy.flower.propagation", weight, low=0.0, high=1.0,
                          low_open=False, high_open=False)
    steps = int(check_number("propagation steps", steps, low=1.0, low_open=False))
    p = np.asarray(probs, dtype=np.float64)
    a = np.asarray(relation, dtype=np.float64)
    r = len(a)
    if p.ndim != 2 or a.shape != (r, r) or r > len(p):
        raise ValueError(f"propagate: relation {a.shape} must be [R, R] with R <= {len(p)} "
                         f"rows of probs {p.shape}")
    out = p.copy()
    if weight == 0.0 or r == 0:
        return out.astype(np.float32)
    has = a.sum(axis=1) > 0
    head = p[:r]
    f = head.copy()
    for _ in range(steps):
        f = np.where(has[:, None], (1.0 - weight) * head + weight * (a @ f), head)
    out[:r] = f / f.sum(axis=1, keepdims=True)
    return out.astype(np.float32)

