"""The in-memory form every data source returns, and the checks shared by the sources."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedkd.errors import ConfigError


@dataclass
class RawData:
    """A labelled data set as loaded by a source, before any split.

    Attributes
    ----------
    x : np.ndarray
        float32 features, shape ``[N, *input_shape]``.
    y : np.ndarray
        int64 labels in ``0..num_classes-1``, shape ``[N]``.
    num_classes : int
        Number of distinct classes (train and test together).
    input_shape : tuple[int, ...]
        Shape of one example.
    x_test, y_test : np.ndarray | None
        An optional separate test set (same encoding); the split then uses it as is.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ConfigError(f"RawData: {len(self.x)} feature rows but {len(self.y)} labels")
        if (self.x_test is None) != (self.y_test is None):
            raise ConfigError("RawData: x_test and y_test must be given together")


def check_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Return ``y`` as int64 after checking it holds integers only.

    Integral floats (``3.0``) are accepted; NaN, fractions, strings are not.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ConfigError(f"{where}: labels must be one-dimensional, got shape {y.shape}")
    if y.dtype == bool or np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if not bad.any():
            return y.astype(np.int64)
        raise ConfigError(
            f"{where}: labels must be integers; found {int(bad.sum())} non-integer values "
            f"(e.g. {y[bad][0]!r})"
        )
    example = y.flat[0] if y.size else None
    raise ConfigError(
        f"{where}: labels must be integers, got dtype {y.dtype} (e.g. {example!r})"
    )


def check_features(x: np.ndarray, num_labels: int, where: str) -> np.ndarray:
    """Return ``x`` as float32 after checking its length and that it is finite."""
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: features must be numeric ({err})") from err
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim == 0 or len(x) != num_labels:
        raise ConfigError(
            f"{where}: length mismatch, {len(x)} feature rows but {num_labels} labels"
        )
    bad = ~np.isfinite(x)
    if bad.any():
        raise ConfigError(
            f"{where}: features contain {int(bad.sum())} NaN or infinite values "
            f"(first in row {int(np.argwhere(bad)[0][0])})"
        )
    return x


def encode_labels(
    y: np.ndarray, y_test: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Map arbitrary integer labels to ``0..C-1`` by their sorted unique values.

    The mapping is built from the union of train and test labels, so both use the same codes.

    Returns
    -------
    tuple
        ``(y_codes, y_test_codes or None, num_classes)``.
    """
    pool = y if y_test is None else np.concatenate([y, y_test])
    classes = np.unique(pool)
    codes = np.searchsorted(classes, y).astype(np.int64)
    test_codes = None if y_test is None else np.searchsorted(classes, y_test).astype(np.int64)
    return codes, test_codes, len(classes)


def make_raw(
    x: np.ndarray,
    y: np.ndarray,
    where: str,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
) -> RawData:
    """Check features and labels, encode the labels and build a :class:`RawData`."""
    y = check_labels(y, where)
    x = check_features(x, len(y), where)
    if x_test is not None and y_test is not None:
        y_test = check_labels(y_test, f"{where} (test)")
        x_test = check_features(x_test, len(y_test), f"{where} (test)")
        if x_test.shape[1:] != x.shape[1:]:
            raise ConfigError(
                f"{where}: test features have shape {x_test.shape[1:]}, "
                f"train features {x.shape[1:]}; they must match"
            )
    if len(y) == 0:
        raise ConfigError(f"{where}: the data set is empty")
    codes, test_codes, num_classes = encode_labels(y, y_test)
    return RawData(
        x=x,
        y=codes,
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        x_test=x_test,
        y_test=test_codes,
    )
