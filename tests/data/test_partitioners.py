"""FedGen's capped Dirichlet split (`fedkd.data.partitioners`)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from fedkd.data.partitioners import CappedDirichletPartitioner, capped_dirichlet
from fedkd.errors import ConfigError


def _labels(n_per_class: int = 300, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), n_per_class)


def test_every_row_once_and_min_size_met():
    labels = _labels()
    parts = capped_dirichlet(labels, 20, 0.1, 300, 10, np.random.default_rng(0))
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(len(labels)))
    assert min(len(p) for p in parts) >= 10


def test_a_full_partition_gets_no_later_label():
    # cap 1 row: whoever got rows of the first label visited is full and gets none of the second
    labels = _labels(50, 2)
    parts = capped_dirichlet(labels, 10, 0.05, 1, 0, np.random.default_rng(1))
    assert sum(len(p) > 0 for p in parts) < 10  # not everyone got the first label
    assert all(len(np.unique(labels[p])) <= 1 for p in parts)


def test_partitioner_is_seeded_and_reads_the_label_column():
    labels = _labels()
    ds = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    sizes = []
    for seed in (3, 3, 4):
        p = CappedDirichletPartitioner(8, "label", 0.5, 600, 10, seed=seed)
        p.dataset = ds
        sizes.append([len(p.load_partition(i)) for i in range(8)])
    assert sizes[0] == sizes[1] != sizes[2] and sum(sizes[0]) == len(labels)


def test_impossible_minimum_names_the_fix():
    with pytest.raises(ConfigError, match="min_partition_size=100 rows each"):
        capped_dirichlet(_labels(10, 2), 5, 0.1, 5, 100, np.random.default_rng(0))
