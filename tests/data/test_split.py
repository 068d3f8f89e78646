"""Test/public/private split and public-only normalisation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedkd.data.raw import RawData
from fedkd.data.split import normalize, normalizer, split_data
from fedkd.errors import ConfigError, show
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
    with pytest.raises(ConfigError, match=rf"dataset.test_fraction.*{re.escape(show(fraction))}"):
        split_data(make_raw(), fraction, 10, seed=0)


@pytest.mark.parametrize("size", [0, 240, 1000, 1.0, 0.0, "10", None])
def test_bad_public_size(size: object) -> None:
    with pytest.raises(ConfigError, match=rf"dataset.public_size.*{re.escape(show(size))}"):
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


TINY_PUBLIC = np.array([[1, 10, 5], [3, 30, 5]], dtype=np.float32)
TINY_X = np.array([[5, 0, 7], [2, 20, 5]], dtype=np.float32)


def test_columns_golden_values() -> None:
    # column means [2, 20, 5], stds [1, 10, 0]: the constant column keeps scale 1
    out = normalizer(TINY_PUBLIC, "columns")(TINY_X)

    np.testing.assert_allclose(out, [[3, -2, 2], [0, 0, 0]], atol=1e-6)
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("none", TINY_X),
        ("minmax", (TINY_X - 1) / 29),  # public min 1, max 30
        ("standard", (TINY_X - 9) / np.sqrt(574 / 6)),  # one mean 9 and std over all values
    ],
)
def test_scalar_modes_golden_values(mode: str, expected: np.ndarray) -> None:
    out = normalizer(TINY_PUBLIC, mode)(TINY_X)

    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_auto_is_per_column_for_tables_and_scalar_for_images_and_signals() -> None:
    table, image, signal = make_raw(shape=(5,)), make_raw(shape=(1, 8, 8)), make_raw(shape=(1, 40))

    for raw, same_as in ((table, "columns"), (image, "standard"), (signal, "standard")):
        split = split_data(raw, 0.2, 60, seed=0)
        auto, other = normalize(split, "auto"), normalize(split, same_as)
        assert np.array_equal(auto.private_x, other.private_x), raw.input_shape
        assert np.array_equal(auto.test_x, other.test_x), raw.input_shape


def _scaled_table(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Columns of one table multiplied by 0.01 .. 1000 and shifted, and the table standardised."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(n, 6)) * [1, 2, 0.5, 3, 1, 1] + [0, 5, -3, 1, 100, 0]
    factors = np.array([1, 1000, 0.01, 250, 10, 1000])
    scaled = (base * factors + [0, -7, 0.1, 1e4, 0, 50]).astype(np.float32)
    standardised = ((base - base.mean(axis=0)) / base.std(axis=0)).astype(np.float32)
    return scaled, standardised


@pytest.mark.parametrize("mode", ["auto", "columns"])
def test_per_column_normalisation_ignores_the_scale_of_each_column(mode: str) -> None:
    scaled, standardised = _scaled_table()
    labels = np.arange(len(scaled)) % 3
    splits = [split_data(make_raw_from(x, labels), 0.2, 60, seed=0) for x in (scaled, standardised)]

    a, b = (normalize(s, mode) for s in splits)

    for name in ("public_x", "private_x", "test_x"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-4, err_msg=name)
    np.testing.assert_allclose(a.public_x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(a.public_x.std(axis=0), 1, atol=1e-5)
    scalar = normalize(splits[0], "standard")  # one scale for all: the small columns vanish
    assert scalar.public_x[:, 2].std() < 1e-4


def test_columns_uses_public_statistics_only() -> None:
    split = split_data(make_raw(shape=(3,)), 0.2, 60, seed=0)
    split = type(split)(**{**vars(split), "private_x": split.private_x * 100 + 7})

    out = normalize(split, "columns")

    mean, std = split.public_x.mean(axis=0), split.public_x.std(axis=0)
    np.testing.assert_allclose(out.private_x, (split.private_x - mean) / std, rtol=1e-4)


def test_digits_minmax_numbers_are_pinned() -> None:
    from fedkd.data.cache import fingerprint
    from fedkd.data.sources import digits

    split = normalize(split_data(digits(), 0.3, 400, seed=42), "minmax")

    assert fingerprint(split.public_x) == "99cdaf1e64192ba9"  # as before per-column modes existed


def test_unknown_mode_lists_every_mode() -> None:
    with pytest.raises(ConfigError, match=r"'zscore' is unknown; allowed: none, minmax, standard, "
                                          r"columns, auto$"):
        normalizer(TINY_PUBLIC, "zscore")


def make_raw_from(x: np.ndarray, y: np.ndarray) -> RawData:
    return RawData(x=x, y=y.astype(np.int64), num_classes=int(y.max()) + 1,
                   input_shape=tuple(x.shape[1:]))
