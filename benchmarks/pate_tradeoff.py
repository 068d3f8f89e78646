"""The privacy-utility trade-off of PATE's Confident GNMax at 10, 50 and 100 teachers.

Vote histograms come from synthetic teachers (per query, the share of teachers voting for the true class is
drawn from a Beta distribution; the others vote uniformly for a wrong class), or from a file of real
histograms (``--votes votes.npy``: ``[N, C]`` counts, with ``--labels labels.npy`` for the accuracy). Each
setting is answered once with `fedkd.aggregation.ConfidentVote` (seeded); the table gives the answered share,
the accuracy of the answered labels, the data-dependent epsilon, the data-independent bound, and what plain
GNMax (`NoisyVote`, every query answered with the same sigma) would cost::

    python -m benchmarks.pate_tradeoff                     # 10, 50, 100 teachers, 1000 queries, table
    python -m benchmarks.pate_tradeoff --queries 200 --csv out.csv
    python -m benchmarks.pate_tradeoff --votes votes.npy --labels labels.npy --setting 60,20,10   # real votes
                                                             # (benchmarks.pate_votes), T and noise in votes

Threshold and noise are given as fractions of the number of teachers K (the paper's MNIST setting with K = 250
is T = 0.8 K, sigma1 = 0.6 K, sigma2 = 0.16 K).
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fedkd.aggregation import ConfidentVote, TeacherMeta, answered_rows
from fedkd.privacy import GNMaxAccountant

log = logging.getLogger(__name__)

TEACHERS = (10, 50, 100)
SETTINGS = {  # name: (threshold, sigma1, sigma2) as fractions of K
    "loose": (0.5, 0.3, 0.1),
    "paper": (0.8, 0.6, 0.16),
    "strict": (0.9, 0.6, 0.3),
}


def synthetic_votes(teachers: int, queries: int, classes: int = 10, agreement: tuple[float, float] = (5.0, 1.5),
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``([N, C] vote counts, [N] true labels)`` of `teachers` synthetic teachers.

    Per query, each teacher votes for the true class with probability ``a ~ Beta(*agreement)`` (mean 0.77 by
    default), else for a uniformly drawn wrong class.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=queries)
    share = rng.beta(*agreement, size=queries)
    right = rng.random((queries, teachers)) < share[:, None]
    wrong = (labels[:, None] + rng.integers(1, classes, size=(queries, teachers))) % classes
    votes = np.where(right, labels[:, None], wrong)
    counts = np.zeros((queries, classes))
    np.add.at(counts, (np.repeat(np.arange(queries), teachers), votes.ravel()), 1.0)
    return counts, labels


def counts_to_logits(counts: np.ndarray) -> np.ndarray:
    """``[K, N, C]`` one-hot logits of K teachers whose argmax votes give ``counts`` ``[N, C]``."""
    teachers = int(counts[0].sum())
    votes = np.stack([np.repeat(np.arange(counts.shape[1]), row.astype(int)) for row in counts], axis=1)
    assert votes.shape[0] == teachers
    return np.eye(counts.shape[1])[votes]


def tradeoff(counts: np.ndarray, labels: np.ndarray | None, threshold: float, sigma1: float, sigma2: float,
             delta: float = 1e-5, seed: int = 0) -> dict[str, float]:
    """One Confident GNMax pass over every query: answered share, accuracy and both epsilons."""
    teachers = int(counts[0].sum())
    vote = ConfidentVote(threshold, sigma1, sigma2, delta)
    meta = TeacherMeta(num_examples=np.ones(teachers), partition_ids=np.arange(teachers), seed=seed)
    soft = vote(counts_to_logits(counts), meta)
    answered = answered_rows(soft)
    accuracy = (float((soft[answered].argmax(axis=1) == labels[answered]).mean())
                if labels is not None and answered.any() else float("nan"))
    plain = GNMaxAccountant(sigma2, delta)
    plain.spend(len(counts))
    return {"teachers": teachers, "T": threshold, "sigma1": sigma1, "sigma2": sigma2, "queries": len(counts),
            "answered": int(answered.sum()), "accuracy": accuracy, "epsilon": vote.epsilon,
            "epsilon_data_independent": vote.epsilon_data_independent, "gnmax_all_epsilon": plain.epsilon}


def table(queries: int, teachers: tuple[int, ...] = TEACHERS, seed: int = 0) -> pd.DataFrame:
    """The trade-off at every (teachers, setting) on synthetic votes."""
    rows = []
    for k, (name, (t, s1, s2)) in itertools.product(teachers, SETTINGS.items()):
        counts, labels = synthetic_votes(k, queries, seed=seed)
        rows.append({"setting": name, **tradeoff(counts, labels, t * k, s1 * k, s2 * k, seed=seed)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Log the table; ``--csv`` also writes it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--votes", type=Path, help="[N, C] vote counts (.npy) instead of synthetic teachers")
    parser.add_argument("--labels", type=Path, help="[N] true labels (.npy) of --votes")
    parser.add_argument("--setting", action="append", default=[], metavar="T,SIGMA1,SIGMA2",
                        help="with --votes: also answer with this threshold and noise, in votes (repeatable)")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.votes is not None:
        counts = np.load(args.votes)
        labels = np.load(args.labels) if args.labels is not None else None
        k = int(counts[0].sum())
        settings = [(name, (t * k, s1 * k, s2 * k)) for name, (t, s1, s2) in SETTINGS.items()]
        settings += [(text, tuple(float(v) for v in text.split(","))) for text in args.setting]
        frame = pd.DataFrame([{"setting": name, **tradeoff(counts, labels, t, s1, s2, seed=args.seed)}
                              for name, (t, s1, s2) in settings])
    else:
        frame = table(args.queries, seed=args.seed)
    log.info("%s", frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.csv is not None:
        frame.to_csv(args.csv, index=False)
    return frame


if __name__ == "__main__":
    main()
