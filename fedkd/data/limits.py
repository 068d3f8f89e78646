"""A per-class cap on the private pool, and each client's own-label test chunk (pure functions).

FedGen keeps 1,500 MNIST images per label and evaluates each user on a chunk of the test set
holding only the user's labels. These functions do both, deterministically from a seed.
"""

from __future__ import annotations

import numpy as np

from fedkd.errors import ConfigError


def check_limit(value: object, key: str) -> int | None:
    """``None`` or an int >= 1 for ``dataset.<key>``; ConfigError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"dataset.{key}", value, "must be an int >= 1 or null")
    return int(value)


def per_class_subset(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices keeping at most `max_per_class` rows of each class, drawn at random (seeded).

    FedGen keeps 1,500 MNIST training images per label (15,000 in all).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:max_per_class]
              for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def own_label_chunks(test_y: np.ndarray, histograms: np.ndarray, seed: int) -> list[np.ndarray]:
    """Disjoint test chunks, one per client, holding only the labels the client trains on.

    FedGen's ``divide_test_data``: the test rows of class ``c`` are shuffled (seeded), and every
    client holding at least one private row of ``c`` takes the next ``len(rows of c) // K`` of
    them (``K`` clients). A chunk thus has equally many rows of each of its client's labels.

    Parameters
    ----------
    test_y : np.ndarray
        ``[N]`` test labels.
    histograms : np.ndarray
        ``[K, C]`` private rows per class of each client.
    seed : int
        Seed of the shuffles.
    """
    hist = np.asarray(histograms, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in range(len(hist))]
    for c in range(hist.shape[1]):
        rows = rng.permutation(np.flatnonzero(np.asarray(test_y) == c))
        share = len(rows) // max(len(hist), 1)
        for i, k in enumerate(np.flatnonzero(hist[:, c] > 0)):
            chunks[k].append(rows[i * share:(i + 1) * share])
    return [np.sort(np.concatenate(c)) if c else np.zeros(0, dtype=np.int64) for c in chunks]
