"""Test/public/private split and public-only normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.data.split import normalize, split_data
from fedkd.errors import ConfigError
from tests.data.factories import make_raw


def test_split_sizes_and_stratification() -> None:
    raw = make_raw(n=300, num_classes=3)

    split = split_data(raw, test_fraction=0.2, public_size=60, seed=0)

    assert len(split.test_y) == 60
    assert len(split.public_x) == 60
    assert len(split.private_y) == 180
    assert np.bincount(split.test_y).tolist() == [20, 20, 20]
    assert np.bincount(split.private_y).tolist() == [60, 60, 60]
    assert np.bincount(raw.y[split.public_ids]).tolist() == [20, 20, 20]
    assert len(np.intersect1d(split.public_ids, split.private_ids)) == 0


def test_split_has_no_public_labels() -> None:
    split = split_data(make_raw(), 0.2, 60, seed=0)

    assert not any("public_y" in name for name in vars(split))


def test_public_size_fraction_is_share_of_train_rows() -> None:
    split = split_data(make_raw(n=300), test_fraction=0.2, public_size=0.25, seed=0)

    assert len(split.public_x) == 60


def test_separate_test_set_is_used_and_fraction_ignored() -> None:
    raw = make_raw(n=100)
    raw.x_test, raw.y_test = raw.x[:7].copy(), raw.y[:7].copy()

    split = split_data(raw, test_fraction=5.0, public_size=10, seed=0)

    assert len(split.test_y) == 7
    assert len(split.public_x) + len(split.private_y) == 100


def test_split_is_deterministic_in_seed() -> None:
    raw = make_raw()

    a, b, c = (split_data(raw, 0.2, 60, seed=s) for s in (1, 1, 2))

    assert np.array_equal(a.private_ids, b.private_ids)
    assert not np.array_equal(a.private_ids, c.private_ids)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, "0.2", True])
def test_bad_test_fraction(fraction: object) -> None:
    with pytest.raises(ConfigError, match=rf"dataset.test_fraction.*{fraction}"):
        split_data(make_raw(), fraction, 10, seed=0)


@pytest.mark.parametrize("size", [0, 240, 1000, 1.0, 0.0, "10", None])
def test_bad_public_size(size: object) -> None:
    with pytest.raises(ConfigError, match=rf"dataset.public_size.*{size}"):
        split_data(make_raw(n=300), 0.2, size, seed=0)


@pytest.mark.parametrize("mode", ["minmax", "standard"])
def test_normalize_uses_public_statistics_only(mode: str) -> None:
    split = split_data(make_raw(), 0.2, 60, seed=0)
    split = type(split)(**{**vars(split), "private_x": split.private_x * 100 + 7})

    out = normalize(split, mode)

    if mode == "minmax":
        assert out.public_x.min() == 0.0 and out.public_x.max() == pytest.approx(1.0)
        low, span = split.public_x.min(), np.ptp(split.public_x)
        assert np.allclose(out.private_x, (split.private_x - low) / span, atol=1e-4)
    else:
        assert out.public_x.mean() == pytest.approx(0.0, abs=1e-5)
        assert out.public_x.std() == pytest.approx(1.0, abs=1e-5)
        mean, std = split.public_x.mean(), split.public_x.std()
        assert np.allclose(out.test_x, (split.test_x - mean) / std, atol=1e-5)
    assert out.private_x.dtype == np.float32


def test_normalize_none_is_identity() -> None:
    split = split_data(make_raw(), 0.2, 60, seed=0)

    assert np.array_equal(normalize(split, "none").private_x, split.private_x)


def test_normalize_unknown_mode_lists_allowed() -> None:
    split = split_data(make_raw(), 0.2, 60, seed=0)

    with pytest.raises(ConfigError, match="zscore.*none, minmax, standard"):
        normalize(split, "zscore")
