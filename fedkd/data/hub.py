"""Hugging Face Hub source, built to fail fast and clearly when there is no internet."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from fedkd.data.raw import RawData, make_raw
from fedkd.errors import ConfigError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def hub(
    name: str,
    split: str = "train",
    label_column: str = "label",
    feature_column: str | None = None,
    test_split: str | None = None,
    connect_timeout_s: float = 5.0,
) -> RawData:
    """A Hugging Face data set, e.g. ``"ylecun/mnist"`` (needs internet or a local HF cache).

    Before asking ``datasets`` (which retries for ~25 s when offline), the Hub endpoint is
    probed with a short timeout; with ``HF_HUB_OFFLINE=1`` the probe is skipped and only the
    local cache is used. Image columns become ``(C, H, W)`` float arrays.

    Parameters
    ----------
    name : str
        Hub id of the data set.
    split : str
        Split used as the training pool.
    label_column, feature_column : str, str | None
        Column names; ``None`` takes the only other column, or all other numeric columns.
    test_split : str | None
        Optional split used as the separate test set.
    connect_timeout_s : float
        Time allowed for the reachability probe.
    """
    if not _offline_mode() and not _hub_reachable(connect_timeout_s):
        raise ConfigError(
            f"dataset.hf_name='{name}': the data set could not be fetched, the Hugging Face "
            f"Hub is unreachable (no internet? probe timeout {connect_timeout_s:g} s). Use "
            f"the 'files' source with local .npz/.parquet/.csv files instead, or set "
            f"HF_HUB_OFFLINE=1 if the data set is already in the local Hugging Face cache."
        )
    train = _load_split(name, split)
    test = None if test_split is None else _load_split(name, test_split)
    return dataset_to_raw(train, test, label_column, feature_column, where=f"hub '{name}'")


def dataset_to_raw(
    train: datasets.Dataset,
    test: datasets.Dataset | None,
    label_column: str,
    feature_column: str | None,
    where: str,
) -> RawData:
    """Convert in-memory ``datasets.Dataset`` objects to a :class:`RawData`."""
    column = _feature_column(train, label_column, feature_column, where)
    x, y = _to_arrays(train, column, label_column)
    if test is None:
        return make_raw(x, y, where)
    x_test, y_test = _to_arrays(test, column, label_column)
    return make_raw(x, y, where, x_test, y_test)


def _offline_mode() -> bool:
    """Whether the user asked Hugging Face libraries to stay offline."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag.strip().lower() in _TRUE for flag in flags)


def _hub_reachable(timeout_s: float) -> bool:
    """Probe a TCP connection to the Hub (or the HTTPS proxy) within ``timeout_s``.

    The probe runs in a daemon thread because name resolution ignores socket timeouts.
    """
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: dict[str, bool] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result["ok"] = True
        except OSError as err:
            log.debug("Hub probe to %s:%s failed: %s", host, port, err)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result.get("ok", False)


def _load_split(name: str, split: str) -> datasets.Dataset:
    """``datasets.load_dataset`` with every failure turned into a ConfigError."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFound...)
        raise ConfigError(
            f"dataset.hf_name='{name}' (split '{split}') could not be fetched: {err}. "
            f"No internet? Use the 'files' source with local files instead."
        ) from err


def _feature_column(
    ds: datasets.Dataset, label_column: str, feature_column: str | None, where: str
) -> str | list[str]:
    """The feature column to use: the given one, the only other one, or all others."""
    columns = list(ds.column_names)
    if label_column not in columns:
        raise ConfigError(f"{where}: no label column '{label_column}'; columns are {columns}")
    if feature_column is not None:
        if feature_column not in columns:
            raise ConfigError(
                f"{where}: no feature column '{feature_column}'; columns are {columns}"
            )
        return feature_column
    others = [c for c in columns if c != label_column]
    if not others:
        raise ConfigError(f"{where}: no feature columns besides '{label_column}'")
    return others[0] if len(others) == 1 else others


def _to_arrays(
    ds: datasets.Dataset, column: str | list[str], label_column: str
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one split as numpy arrays."""
    table = ds.with_format("numpy")
    y = np.asarray(table[label_column])
    if isinstance(column, list):
        return np.stack([np.asarray(table[c], dtype=np.float32) for c in column], axis=1), y
    x = np.asarray(table[column])
    if _is_image(ds.features[column]):
        x = _channels_first(x)
    return x, y


def _is_image(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def _channels_first(images: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` -> ``[N, 1, H, W]``; ``[N, H, W, C]`` -> ``[N, C, H, W]``."""
    if images.ndim == 3:
        return images[:, None, :, :]
    return np.moveaxis(images, -1, 1)
