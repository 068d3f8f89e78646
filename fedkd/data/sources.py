"""Data sources: each returns a :class:`RawData` and is picked by a Hydra ``_target_``.

``dataset.source`` in the config names one of these functions (or any other callable that
returns a :class:`RawData`), so adding a data set means adding a function, not a branch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedkd.data.cache import load_npz
from fedkd.data.hub import hub
from fedkd.data.raw import RawData, make_raw
from fedkd.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RawData", "digits", "files", "hub", "mnist1d"]

log = logging.getLogger(__name__)

Table = tuple[np.ndarray, np.ndarray]


def digits() -> RawData:
    """Scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

    Images come as ``(1, 8, 8)`` float32 with the raw 0..16 intensities.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]
    return make_raw(x, bunch.target, "digits")


def mnist1d(num_samples: int = 5000, seed: int = 42) -> RawData:
    """MNIST-1D generated locally (Greydanus 2020): 40-step signals, 10 classes.

    The package's own train and test parts are merged into ``x`` with shape ``(N, 1, 40)``;
    the split into test/public/private happens later. Generation is deterministic in ``seed``
    and leaves the global ``random``/``numpy`` RNG state as it found it.

    Parameters
    ----------
    num_samples : int
        Total number of signals (rounded down to a multiple of 10).
    seed : int
        Seed of the generator.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if num_samples < 10:
        raise ConfigError("dataset.source.num_samples", num_samples, "must be an int >= 10")
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)  # seeds the global RNGs itself
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([data["x"], data["x_test"]])[:, None, :]
    y = np.concatenate([data["y"], data["y_test"]])
    return make_raw(x, y, "mnist1d")


def files(path: str, test_path: str | None = None, label_column: str = "label") -> RawData:
    """Labelled data from local files: ``.npz``, ``.parquet`` or ``.csv``.

    ``.npz`` holds arrays ``x`` (``N x any shape``) and ``y`` (``N`` integer labels). Tables hold
    a ``label_column`` and numeric feature columns, read as ``(F,)`` float32 vectors. Labels may
    be any integers; they are mapped to ``0..C-1`` by sorted value, the same way for train and
    the optional separate ``test_path`` file.
    """
    x, y = _read_file(path, "dataset.source.path", label_column)
    if test_path is None:
        return make_raw(x, y, f"file '{path}'")
    x_test, y_test = _read_file(test_path, "dataset.source.test_path", label_column)
    return make_raw(x, y, f"files '{path}' + '{test_path}'", x_test, y_test)


def read_labelled_file(path: str, key: str, label_column: str = "label") -> Table:
    """Features and raw labels of one ``.npz``/``.parquet``/``.csv`` file, as ``files`` reads it.

    `key` names the setting the path came from, for error messages.
    """
    return _read_file(path, key, label_column)


def _read_file(path: str, key: str, label_column: str) -> Table:
    """Read one file with the reader its extension selects."""
    file = Path(path).expanduser()
    reader = _READERS.get(file.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"{key}='{path}': unknown file extension '{file.suffix}'; "
            f"allowed: {', '.join(sorted(_READERS))}"
        )
    if not file.is_file():
        raise ConfigError(f"{key}='{path}': file not found")
    log.debug("Reading %s", file)
    return reader(file, label_column)


def _read_npz(file: Path, label_column: str) -> Table:
    """Arrays ``x`` and ``y`` from an ``.npz`` archive (``label_column`` does not apply)."""
    archive = load_npz(file)
    missing = [name for name in ("x", "y") if name not in archive]
    if missing:
        raise ConfigError(
            f"file '{file}': missing array(s) {missing}; an .npz source needs arrays "
            f"'x' and 'y', found {sorted(archive)}"
        )
    return archive["x"], archive["y"]


def _read_parquet(file: Path, label_column: str) -> Table:
    import pandas as pd

    return _split_table(pd.read_parquet(file), file, label_column)


def _read_csv(file: Path, label_column: str) -> Table:
    import pandas as pd

    return _split_table(pd.read_csv(file), file, label_column)


def _split_table(frame: pd.DataFrame, file: Path, label_column: str) -> Table:
    """Split a DataFrame into numeric features and the label column."""
    if label_column not in frame.columns:
        raise ConfigError(
            f"file '{file}': no label column '{label_column}' (dataset.label_column); "
            f"columns are {list(frame.columns)}"
        )
    features = frame.drop(columns=[label_column])
    if features.shape[1] == 0:
        raise ConfigError(f"file '{file}': no feature columns besides '{label_column}'")
    import pandas as pd

    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise ConfigError(f"file '{file}': feature columns must be numeric, got {non_numeric}")
    return features.to_numpy(dtype=np.float32), frame[label_column].to_numpy()


_READERS: dict[str, Callable[[Path, str], Table]] = {
    ".npz": _read_npz,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}
