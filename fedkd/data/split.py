"""Split raw data into test / public (unlabelled) / private rows, and normalise them.

The public set is the transfer set of knowledge distillation: every node holds its inputs,
nobody holds its labels, so :class:`Split` has no field for them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fedkd.data.raw import RawData
from fedkd.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Test, public and private rows of one data set.

    Attributes
    ----------
    test_x, test_y : np.ndarray
        Held-out evaluation set.
    public_x : np.ndarray
        Unlabelled transfer set shared by all nodes.
    private_x, private_y : np.ndarray
        Labelled pool that the partitioner spreads over the clients.
    public_ids, private_ids : np.ndarray
        Row numbers of these sets in the raw training pool (provenance, for hashing).
    """

    test_x: np.ndarray
    test_y: np.ndarray
    public_x: np.ndarray
    private_x: np.ndarray
    private_y: np.ndarray
    public_ids: np.ndarray
    private_ids: np.ndarray


def split_data(raw: RawData, test_fraction: float, public_size: int | float, seed: int) -> Split:
    """Stratified split into test, public and private rows.

    Parameters
    ----------
    raw : RawData
        Loaded data; when it has a separate test set, that is used and ``test_fraction`` ignored.
    test_fraction : float
        Share of the rows held out for testing, in (0, 1).
    public_size : int | float
        Public rows: an int is a count, a float in (0, 1) a share of the remaining train rows.
    seed : int
        Seed of both random splits.
    """
    ids = np.arange(len(raw.y))
    if raw.x_test is None:
        _check_fraction(test_fraction, "dataset.test_fraction")
        n_test = math.ceil(test_fraction * len(ids))  # as sklearn rounds test_size
        if not 0 < n_test < len(ids):
            raise ConfigError(
                f"dataset.test_fraction={test_fraction} leaves {n_test} test rows out of "
                f"{len(ids)}; it must leave at least one test and one train row"
            )
        train_ids, test_ids = _stratified_split(ids, raw.y, n_test, seed)
        test_x, test_y = raw.x[test_ids], raw.y[test_ids]
    else:
        log.info("Using the source's separate test set; dataset.test_fraction is ignored")
        train_ids, test_x, test_y = ids, raw.x_test, raw.y_test
    n_public = _public_count(public_size, len(train_ids))
    private_ids, public_ids = _stratified_split(train_ids, raw.y, n_public, seed + 1)
    return Split(
        test_x=test_x,
        test_y=test_y,
        public_x=raw.x[public_ids],
        private_x=raw.x[private_ids],
        private_y=raw.y[private_ids],
        public_ids=public_ids,
        private_ids=private_ids,
    )


def normalize(split: Split, mode: str) -> Split:
    """Normalise every set with statistics of the public set.

    The public set is the only data every node holds, so its statistics can be computed
    anywhere without leaking private data.

    Parameters
    ----------
    mode : str
        One of `NORMALIZE_MODES`: ``none``, ``minmax`` (public min/max to [0, 1]) and
        ``standard`` (public mean/std) use one scalar shift and scale for all features;
        ``columns`` standardises each feature (column) on its own; ``auto`` is ``columns`` for
        rank-1 inputs (feature vectors, table rows) and ``standard`` for images and signals.
    """
    apply = normalizer(split.public_x, mode)
    return replace(
        split,
        test_x=apply(split.test_x),
        public_x=apply(split.public_x),
        private_x=apply(split.private_x),
    )


def normalizer(public_x: np.ndarray, mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> float32((x - shift) / scale)`` with statistics of the public set ``[N, *shape]``.

    ``shift`` and ``scale`` are scalars, or arrays of one example's shape (``columns``). A
    deployed node computes the same function from its own copy of the public set.
    """
    stats = _NORMALIZERS.get(mode)
    if stats is None:
        raise ConfigError(
            f"dataset.normalize='{mode}' is unknown; allowed: {', '.join(NORMALIZE_MODES)}"
        )
    shift, scale = stats(public_x)
    _log_stats(mode, shift, scale)

    def apply(x: np.ndarray) -> np.ndarray:
        return ((x - shift) / scale).astype(np.float32)

    return apply


Stats = tuple[float | np.ndarray, float | np.ndarray]
"""(shift, scale): scalars, or float64 arrays shaped like one example."""


def _no_stats(x: np.ndarray) -> Stats:
    return 0.0, 1.0


def _minmax_stats(x: np.ndarray) -> Stats:
    low, high = float(x.min()), float(x.max())
    return low, (high - low) or 1.0


def _standard_stats(x: np.ndarray) -> Stats:
    return float(x.mean()), float(x.std()) or 1.0


def _column_stats(x: np.ndarray) -> Stats:
    """Mean and std of every feature over the rows (float64); a constant feature gets scale 1."""
    wide = np.asarray(x, dtype=np.float64)
    constant = wide.max(axis=0) == wide.min(axis=0)  # std 0, whatever the rounding of the mean
    if constant.any():
        log.info("%d feature(s) constant on the public set: shifted, scale left at 1",
                 int(constant.sum()))
    return wide.mean(axis=0), np.where(constant, 1.0, wide.std(axis=0))


def _auto_stats(x: np.ndarray) -> Stats:
    """Per-column statistics for rank-1 inputs (tables), one scalar mean/std otherwise."""
    return _column_stats(x) if x.ndim == 2 else _standard_stats(x)


_NORMALIZERS: dict[str, Callable[[np.ndarray], Stats]] = {
    "none": _no_stats,
    "minmax": _minmax_stats,
    "standard": _standard_stats,
    "columns": _column_stats,
    "auto": _auto_stats,
}
NORMALIZE_MODES = tuple(_NORMALIZERS)
"""Allowed values of ``dataset.normalize``."""


def _log_stats(mode: str, shift: float | np.ndarray, scale: float | np.ndarray) -> None:
    if np.ndim(shift) == 0:
        log.info("Normalisation '%s' from the public set: shift=%.4g scale=%.4g",
                 mode, shift, scale)
        return
    log.info("Normalisation '%s' from the public set, per feature (%d): shift in [%.4g, %.4g], "
             "scale in [%.4g, %.4g]", mode, np.size(shift), np.min(shift), np.max(shift),
             np.min(scale), np.max(scale))


def _check_fraction(value: object, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(key, value, "must be a number in (0, 1)")


def _public_count(public_size: int | float, available: int) -> int:
    """Number of public rows for ``dataset.public_size`` given ``available`` train rows."""
    if isinstance(public_size, bool) or not isinstance(public_size, (int, float)):
        raise ConfigError("dataset.public_size", public_size,
                          "must be an int count or a float in (0, 1)")
    if isinstance(public_size, float):
        _check_fraction(public_size, "dataset.public_size")
        count = int(round(public_size * available))
    else:
        count = public_size
    if not 0 < count < available:
        raise ConfigError(
            f"dataset.public_size={public_size} gives {count} public rows, but it must be "
            f"between 1 and {available - 1} (there are {available} train rows and at least "
            f"one must stay private)"
        )
    return count


def _stratified_split(
    ids: np.ndarray, labels: np.ndarray, n_second: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``ids`` into (rest, ``n_second`` rows), stratified by ``labels[ids]`` if possible."""
    from sklearn.model_selection import train_test_split

    try:
        first, second = train_test_split(
            ids, test_size=n_second, stratify=labels[ids], random_state=seed
        )
    except ValueError as err:  # a class with < 2 rows, or fewer rows than classes
        log.warning("Stratified split impossible (%s); splitting at random instead", err)
        first, second = train_test_split(ids, test_size=n_second, random_state=seed)
    return np.asarray(first), np.asarray(second)
