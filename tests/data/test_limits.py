"""Row limits and own-label test chunks (`fedkd.data.limits`): golden values and invariants."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.data.limits import check_limit, own_label_chunks, per_class_subset
from fedkd.errors import ConfigError


def test_per_class_subset_caps_each_class():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    keep = per_class_subset(labels, 20, seed=0)
    assert np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [20, 20, 10]
    assert np.array_equal(keep, per_class_subset(labels, 20, seed=0))  # seeded
    assert not np.array_equal(keep, per_class_subset(labels, 20, seed=1))


def test_own_label_chunks_golden():
    test_y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    hist = np.array([[3, 0, 0], [1, 4, 0], [0, 0, 0], [0, 0, 0]])
    chunks = own_label_chunks(test_y, hist, seed=0)
    # FedGen: each holder of class c takes len(rows of c) // 4 clients = 1 row of c
    assert [len(c) for c in chunks] == [1, 2, 0, 0]
    assert set(test_y[chunks[0]]) == {0}
    assert np.bincount(test_y[chunks[1]], minlength=3).tolist() == [1, 1, 0]


def test_own_label_chunks_are_disjoint_with_equal_rows_per_held_label():
    rng = np.random.default_rng(0)
    test_y = rng.integers(0, 10, 5000)
    hist = rng.integers(1, 50, (20, 10)) * (rng.random((20, 10)) < 0.3)
    chunks = own_label_chunks(test_y, hist, seed=1)
    flat = np.concatenate(chunks)
    assert len(flat) == len(set(flat.tolist()))
    for k, chunk in enumerate(chunks):
        held = np.flatnonzero(hist[k])
        counts = np.bincount(test_y[chunk], minlength=10)
        assert set(np.flatnonzero(counts).tolist()) <= set(held.tolist())
        for c in held:
            assert counts[c] == (test_y == c).sum() // 20


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_check_limit_refuses(value):
    with pytest.raises(ConfigError, match=r"dataset.max_class_rows=.*: must be an int >= 1 or null"):
        check_limit(value, "max_class_rows")
    assert check_limit(None, "x") is None and check_limit(3, "x") == 3
