"""Data sources: bundled sets, local files, and the Hub failing fast offline."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedkd.data import sources
from fedkd.data.hub import dataset_to_raw
from fedkd.errors import ConfigError


def test_digits_shape_and_labels() -> None:
    raw = sources.digits()

    assert raw.x.shape == (1797, 1, 8, 8) and raw.x.dtype == np.float32
    assert raw.y.dtype == np.int64 and raw.num_classes == 10
    assert raw.input_shape == (1, 8, 8) and raw.x.max() == 16.0


def test_mnist1d_is_deterministic_and_leaves_global_rng_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)

    a = sources.mnist1d(num_samples=200, seed=5)
    b = sources.mnist1d(num_samples=200, seed=5)
    c = sources.mnist1d(num_samples=200, seed=6)

    assert a.x.shape == (200, 1, 40) and a.input_shape == (1, 40) and a.num_classes == 10
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert np.random.random() == expected_np and random.random() == expected_py


# ---- files -------------------------------------------------------------------------------

def _table(labels: list[int], offset: float = 0.0) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({"f0": np.arange(n) + offset, "label": labels, "f1": np.ones(n)})


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_files_table_round_trip_with_test_file_and_remap(tmp_path: Path, ext: str) -> None:
    train, test = tmp_path / f"train.{ext}", tmp_path / f"test.{ext}"
    for frame, file in ((_table([10, -3, 10, 7]), train), (_table([7, 42], 100.0), test)):
        getattr(frame, f"to_{ext}")(file, index=False)

    raw = sources.files(str(train), test_path=str(test))

    assert raw.num_classes == 4  # {-3, 7, 10, 42}, train and test together
    assert raw.y.tolist() == [2, 0, 2, 1] and raw.y_test.tolist() == [1, 3]
    assert raw.input_shape == (2,) and raw.x.dtype == np.float32
    assert raw.x[:, 0].tolist() == [0, 1, 2, 3] and raw.x_test[:, 0].tolist() == [100, 101]


def test_files_npz_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 2, 3))
    np.savez(tmp_path / "d.npz", x=x, y=np.array([5, 5, 9, 9, 5, 9]))

    raw = sources.files(str(tmp_path / "d.npz"))

    assert raw.x.shape == (6, 2, 3) and np.allclose(raw.x, x)
    assert raw.y.tolist() == [0, 0, 1, 1, 0, 1] and raw.num_classes == 2 and raw.x_test is None


def test_files_custom_label_column(tmp_path: Path) -> None:
    _table([1, 2]).rename(columns={"label": "target"}).to_csv(tmp_path / "d.csv", index=False)

    assert sources.files(str(tmp_path / "d.csv"), label_column="target").num_classes == 2


def _bad_npz(**arrays: np.ndarray) -> Callable[[Path], str]:
    def write(tmp_path: Path) -> str:
        np.savez(tmp_path / "bad.npz", **arrays)
        return str(tmp_path / "bad.npz")

    return write


def _bad_csv(**columns: list) -> Callable[[Path], str]:
    def write(tmp_path: Path) -> str:
        pd.DataFrame(columns).to_csv(tmp_path / "bad.csv", index=False)
        return str(tmp_path / "bad.csv")

    return write


BAD_FILES = {
    "missing": (lambda p: str(p / "nope.npz"), r"nope\.npz.*not found"),
    "extension": (lambda p: str(p / "d.json"), r"'\.json'.*allowed: \.csv, \.npz, \.parquet"),
    "no y array": (_bad_npz(x=np.ones((2, 2)), labels=np.ones(2)), r"\['y'\]"),
    "no label column": (_bad_csv(a=[1], b=[2]), r"'label'.*\['a', 'b'\]"),
    "float labels": (_bad_npz(x=np.ones((2, 2)), y=np.array([0.5, 1.0])), r"integers.*0\.5"),
    "string labels": (_bad_csv(f=[1, 2], label=["a", "b"]), "integers"),
    "length": (_bad_npz(x=np.ones((3, 2)), y=np.array([0, 1])), "3 feature rows but 2 labels"),
    "nan": (_bad_npz(x=np.array([[np.nan], [1.0]]), y=np.array([0, 1])), "1 NaN"),
    "nan label": (_bad_csv(f=[1, 2], label=[1, None]), "non-integer"),
    "text feature": (_bad_csv(f=["x", "y"], label=[0, 1]), r"\['f'\]"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_files_bad_input_raises_config_error(tmp_path: Path, case: str) -> None:
    make_path, message = BAD_FILES[case]

    with pytest.raises(ConfigError, match=message):
        sources.files(make_path(tmp_path))


def test_files_test_file_shape_mismatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.ones((2, 3)), y=np.array([0, 1]))
    np.savez(tmp_path / "b.npz", x=np.ones((2, 4)), y=np.array([0, 1]))

    with pytest.raises(ConfigError, match=r"\(4,\).*\(3,\)"):
        sources.files(str(tmp_path / "a.npz"), test_path=str(tmp_path / "b.npz"))


def test_files_missing_test_file_names_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.ones((2, 3)), y=np.array([0, 1]))

    with pytest.raises(ConfigError, match=r"test_path=.*gone\.npz"):
        sources.files(str(tmp_path / "a.npz"), test_path=str(tmp_path / "gone.npz"))


# ---- hub ---------------------------------------------------------------------------------

def test_hub_offline_fails_fast_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedkd.data.hub._hub_reachable", lambda timeout_s: False)
    start = time.monotonic()

    message = r"ylecun/mnist.*could not be fetched.*no internet.*'files'"
    with pytest.raises(ConfigError, match=message):
        sources.hub("ylecun/mnist")

    assert time.monotonic() - start < 30


def test_hub_without_patching_returns_within_30_s() -> None:
    """The real probe: offline here it must fail fast; online it could load (then skip)."""
    from fedkd.data.hub import _hub_reachable

    start = time.monotonic()
    reachable = _hub_reachable(5.0)
    assert time.monotonic() - start < 30
    if reachable:
        pytest.skip("the Hub is reachable from here")
    with pytest.raises(ConfigError, match="no internet"):
        sources.hub("ylecun/mnist", connect_timeout_s=5.0)


def test_hub_offline_mode_skips_probe_and_reads_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("fedkd.data.hub._hub_reachable", _fail_if_called)
    cached = datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [4, 2]})
    monkeypatch.setattr("fedkd.data.hub._load_split", lambda name, split: cached)

    raw = sources.hub("some/cached-set")

    assert raw.y.tolist() == [1, 0] and raw.input_shape == (1,)


def _fail_if_called(timeout_s: float) -> bool:
    raise AssertionError("the probe must be skipped in offline mode")


def test_dataset_to_raw_images_become_channels_first() -> None:
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((4, 5), i, np.uint8)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [3, 1, 3]})
    ds = ds.cast_column("image", datasets.Image())

    raw = dataset_to_raw(ds, None, "label", None, where="test")

    assert raw.x.shape == (3, 1, 4, 5) and raw.x[2].max() == 2.0
    assert raw.y.tolist() == [1, 0, 1] and raw.num_classes == 2


def test_dataset_to_raw_tabular_columns_and_missing_label() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"a": [1.0, 2.0], "b": [3, 4], "y": [0, 1]})

    assert dataset_to_raw(ds, ds, "y", None, where="t").x.shape == (2, 2)
    with pytest.raises(ConfigError, match=r"'label'.*\['a', 'b', 'y'\]"):
        dataset_to_raw(ds, None, "label", None, where="t")
