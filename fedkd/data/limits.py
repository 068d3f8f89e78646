"""Row limits of a prepared data set and each client's own-label test chunk (pure functions).

Papers often cap the private pool and each client's share (FedGen: 15,000 MNIST images, at most
1,500 per user), and evaluate each user on a chunk of the test set that follows its own label
distribution. These functions do both, deterministically from a seed.
"""

from __future__ import annotations

import numpy as np

from fedkd.errors import ConfigError


def check_limit(value: object, key: str) -> int | None:
    """``None`` or an int >= 1 for ``dataset.<key>``; ConfigError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"dataset.{key} must be an int >= 1 or null, got {value!r}")
    return int(value)


def stratified_subset(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `max_rows` rows, each class keeping its share (largest remainder).

    All rows when there are no more than `max_rows`.
    """
    labels = np.asarray(labels)
    if len(labels) <= max_rows:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * max_rows / len(labels)
    take = np.floor(quota).astype(int)
    extra = np.argsort(-(quota - take), kind="stable")[: max_rows - take.sum()]
    take[extra] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def cap_partitions(parts: list[np.ndarray], max_rows: int, seed: int) -> list[np.ndarray]:
    """Each partition reduced to at most `max_rows` of its rows, drawn at random (seeded)."""
    out = []
    for i, part in enumerate(parts):
        if len(part) > max_rows:
            rng = np.random.default_rng([seed, i])
            part = np.sort(rng.choice(part, size=max_rows, replace=False))
        out.append(part)
    return out


def own_label_chunks(test_y: np.ndarray, histograms: np.ndarray, seed: int) -> list[np.ndarray]:
    """Disjoint test chunks, one per client, following each client's private label counts.

    The test rows of class ``c`` are shuffled (seeded) and split among the clients in proportion
    to how many rows of ``c`` each holds, as FedGen's data generator does: a client's chunk holds
    only its own labels, in its own proportions.

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
        total = hist[:, c].sum()
        if total == 0 or len(rows) == 0:
            continue
        cuts = (np.cumsum(hist[:, c]) * len(rows) // total)[:-1]
        for k, piece in enumerate(np.split(rows, cuts)):
            chunks[k].append(piece)
    return [np.sort(np.concatenate(c)) if c else np.zeros(0, dtype=np.int64) for c in chunks]
