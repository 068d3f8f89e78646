"""A flwr-datasets partitioner that flwr-datasets lacks: FedGen's capped Dirichlet split.

FedGen (Zhu et al. 2021, ``data/Mnist/generate_niid_dirichlet.py``) splits every label over the
users with Dirichlet(alpha) proportions, but a user that already holds ``max_partition_size`` rows
gets no share of the next labels (the remaining proportions are renormalised), and the draw is
repeated until every user holds at least ``min_partition_size`` rows. flwr-datasets'
``DirichletPartitioner(self_balancing=True)`` does the same with the mean partition size as the
threshold; this one takes the threshold as a parameter, as FedGen does (1,500 rows on MNIST).
"""

from __future__ import annotations

import numpy as np
from flwr_datasets.partitioner import Partitioner

from fedkd.errors import ConfigError

MAX_DRAWS = 1000
"""Draws tried before giving up on `min_partition_size` (FedGen retries without a limit)."""


def capped_dirichlet(labels: np.ndarray, num_partitions: int, alpha: float,
                     max_partition_size: int, min_partition_size: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of each partition (pure function; see the module docstring).

    Labels are visited in a random order; each label's rows are shuffled and split at the
    cumulative Dirichlet proportions of the partitions still under `max_partition_size`.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    for _ in range(MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        sizes = np.zeros(num_partitions, dtype=np.int64)
        for c in rng.permutation(classes):
            rows = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(num_partitions, float(alpha))) * (
                sizes < max_partition_size)
            if share.sum() <= 0:  # every partition is full: spread over all of them
                share = np.ones(num_partitions)
            cuts = (np.cumsum(share / share.sum()) * len(rows)).astype(int)[:-1]
            for k, piece in enumerate(np.split(rows, cuts)):
                parts[k].append(piece)
                sizes[k] += len(piece)
        if sizes.min() >= min_partition_size:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise ConfigError(
        f"partition: CappedDirichletPartitioner found no split of {len(labels)} rows over "
        f"{num_partitions} clients with at least min_partition_size={min_partition_size} rows "
        f"each in {MAX_DRAWS} draws; use a larger alpha, fewer clients (num_clients) or a "
        f"smaller min_partition_size")


class CappedDirichletPartitioner(Partitioner):
    """FedGen's Dirichlet split by label with a per-partition cap on further labels.

    Parameters
    ----------
    num_partitions : int
        Number of clients.
    partition_by : str
        Column holding the labels.
    alpha : float
        Dirichlet concentration (smaller = more skew).
    max_partition_size : int
        A partition holding this many rows gets no share of the labels visited later.
    min_partition_size : int
        Every partition must hold at least this many rows (redrawn until it does).
    seed : int
        Seed of the label order, shuffles and proportions.
    """

    def __init__(self, num_partitions: int, partition_by: str, alpha: float,
                 max_partition_size: int, min_partition_size: int = 10, seed: int = 42) -> None:
        super().__init__()
        if not alpha > 0 or max_partition_size < 1 or min_partition_size < 0:
            raise ConfigError(f"partition: alpha={alpha} must be > 0, max_partition_size="
                              f"{max_partition_size} >= 1, min_partition_size="
                              f"{min_partition_size} >= 0")
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._alpha = alpha
        self._max = max_partition_size
        self._min = min_partition_size
        self._seed = seed
        self._parts: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Number of partitions."""
        return self._num_partitions

    def load_partition(self, partition_id: int):  # -> datasets.Dataset
        """The rows of one partition."""
        if self._parts is None:
            labels = np.asarray(self.dataset[self._partition_by])
            self._parts = capped_dirichlet(labels, self._num_partitions, self._alpha, self._max,
                                           self._min, np.random.default_rng(self._seed))
        return self.dataset.select(self._parts[partition_id].tolist())
