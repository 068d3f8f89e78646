"""Aggregators: teachers' logits ``[K, N, C]`` (+ metadata) -> soft targets ``[N, C]``.

Every aggregator has the same signature, so Hydra can select one (``conf/aggregator/*.yaml``) and the server
calls it as ``aggregator(logits, meta, temperature=T)``::

    def aggregator(logits: np.ndarray, meta: TeacherMeta | None = None, *, temperature: float = 1.0) -> np.ndarray

The result is float32 probabilities at temperature T whose rows sum to 1. Functions are selected with
``_partial_: true`` (their extra hyper-parameters are yaml keys bound by the partial); stateful aggregators are
classes instantiated once per run (``NoisyVote``, ``ConfidentVote``).

Unanswered rows: an aggregator may leave a row unanswered by filling it with NaN (``UNANSWERED``;
``ConfidentVote`` does for rows whose vote is not confident). The strategy keeps only ``answered_rows`` in the
round's transfer set, so students never train on them.

Reporting seam: ANY aggregator object may expose ``report() -> dict[str, float]``; the strategy merges what it
returns into the round's metrics (``NoisyVote`` reports its privacy spent: ``epsilon``, ``epsilon-round``,
``delta``, ``queries``). Stochastic aggregators draw their noise from ``noise_rng(meta)``, keyed on
``meta.seed`` and ``meta.server_round``, so runs are reproducible.

Modules: ``core`` (TeacherMeta, checks, softmax), ``averaging`` (means), ``classwise`` (per-class
count weights), ``robust`` (median, trimmed mean, geometric median; the anomaly score),
``reputation`` (teacher reputation over rounds), ``voting`` (majority and noisy votes), ``confident``
(PATE's Confident GNMax).
"""

from fedkd.aggregation.averaging import (
    confidence_weighted,
    entropy_weighted,
    era,
    mean_logits,
    mean_probs,
    weighted,
)
from fedkd.aggregation.classwise import class_weighted
from fedkd.aggregation.confident import UNANSWERED, ConfidentVote, answered_rows
from fedkd.aggregation.core import (
    TeacherMeta,
    as_soft_targets,
    check_logits,
    check_number,
    check_temperature,
    log_softmax,
    noise_rng,
    softmax,
    weighted_mean_probs,
)
from fedkd.aggregation.reputation import Reputation, outliers
from fedkd.aggregation.robust import (
    anomaly_scores,
    geometric_median,
    median,
    total_variation,
    trimmed_mean,
    weiszfeld,
)
from fedkd.aggregation.voting import NoisyVote, majority_vote, vote_counts

__all__ = [
    "ConfidentVote",
    "NoisyVote",
    "Reputation",
    "TeacherMeta",
    "UNANSWERED",
    "answered_rows",
    "anomaly_scores",
    "as_soft_targets",
    "check_logits",
    "check_number",
    "check_temperature",
    "class_weighted",
    "confidence_weighted",
    "entropy_weighted",
    "era",
    "geometric_median",
    "log_softmax",
    "majority_vote",
    "mean_logits",
    "mean_probs",
    "median",
    "noise_rng",
    "outliers",
    "softmax",
    "total_variation",
    "trimmed_mean",
    "vote_counts",
    "weighted",
    "weighted_mean_probs",
    "weiszfeld",
]
