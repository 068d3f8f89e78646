"""Row limits and own-label test chunks (`fedkd.data.limits`): golden values and invariants."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.data.limits import cap_partitions, check_limit, own_label_chunks, stratified_subset
from fedkd.errors import ConfigError


def test_stratified_subset_keeps_class_shares():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    keep = stratified_subset(labels, 10, seed=0)
    assert len(keep) == 10 and np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [6, 3, 1]
    assert np.array_equal(keep, stratified_subset(labels, 10, seed=0))  # seeded
    assert not np.array_equal(keep, stratified_subset(labels, 10, seed=1))


def test_stratified_subset_largest_remainder_and_no_cap():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 5)
    assert np.bincount(labels[stratified_subset(labels, 7, seed=0)]).sum() == 7
    assert np.array_equal(stratified_subset(labels, 100, seed=0), np.arange(15))


def test_cap_partitions_only_shrinks_large_ones():
    parts = [np.arange(10), np.arange(10, 13)]
    capped = cap_partitions(parts, 4, seed=0)
    assert len(capped[0]) == 4 and set(capped[0]) <= set(parts[0])
    assert np.array_equal(capped[1], parts[1])


def test_own_label_chunks_golden():
    test_y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    hist = np.array([[3, 0, 0], [1, 4, 0], [0, 0, 0]])
    chunks = own_label_chunks(test_y, hist, seed=0)
    # class 0: 4 rows split 3:1; class 1: all 4 to client 1; class 2: nobody holds it
    assert [len(c) for c in chunks] == [3, 5, 0]
    assert set(test_y[chunks[0]]) == {0}
    assert np.bincount(test_y[chunks[1]], minlength=3).tolist() == [1, 4, 0]


def test_own_label_chunks_are_disjoint_and_follow_the_histograms():
    rng = np.random.default_rng(0)
    test_y = rng.integers(0, 10, 5000)
    hist = rng.integers(0, 50, (20, 10)) * (rng.random((20, 10)) < 0.3)
    chunks = own_label_chunks(test_y, hist, seed=1)
    flat = np.concatenate(chunks)
    assert len(flat) == len(set(flat.tolist()))
    for k, chunk in enumerate(chunks):
        held = set(np.flatnonzero(hist[k]).tolist())
        assert set(test_y[chunk].tolist()) <= held
        for c in held:  # within one row of the proportional share
            share = (test_y == c).sum() * hist[k, c] / hist[:, c].sum()
            assert abs((test_y[chunk] == c).sum() - share) <= 1


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_check_limit_refuses(value):
    with pytest.raises(ConfigError, match="dataset.max_client_rows must be an int >= 1 or null"):
        check_limit(value, "max_client_rows")
    assert check_limit(None, "x") is None and check_limit(3, "x") == 3
