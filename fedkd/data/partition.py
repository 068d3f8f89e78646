"""Spread the private rows over clients with flwr-datasets partitioners.

The partitioner is any ``flwr_datasets.partitioner.Partitioner`` named by a Hydra ``_target_``
(``IidPartitioner``, ``DirichletPartitioner``, ``PathologicalPartitioner``, ...). It runs on an
in-memory ``datasets.Dataset`` with columns ``label`` and ``idx``, fully offline.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedkd.data._config import instantiate, require_target
from fedkd.errors import ConfigError

log = logging.getLogger(__name__)


def make_partitioner(
    cfg: Mapping[str, Any],
    num_partitions: int,
    num_samples: int,
    *,
    seed: int | None = None,
    num_classes: int | None = None,
) -> Any:
    """Validate a partitioner config node and instantiate it with ``num_partitions``.

    Parameters
    ----------
    cfg : Mapping
        The ``partition.partitioner`` node (``_target_`` plus constructor arguments).
    num_partitions : int
        Number of clients.
    num_samples : int
        Number of private rows to be partitioned.
    seed : int | None
        If given and the partitioner takes a ``seed``, it is set to this value (overriding
        the node), so the partition provably follows ``partition_seed``.
    num_classes : int | None
        Number of classes, to check ``num_classes_per_partition`` early.
    """
    node = require_target(cfg, "partition.partitioner")
    _check_counts(num_partitions, num_samples)
    _check_alpha(node.get("alpha"))
    _check_classes_per_partition(node.get("num_classes_per_partition"), num_classes)
    min_size = node.get("min_partition_size", _default_argument(node, "min_partition_size"))
    _check_min_size(min_size, num_partitions, num_samples)
    node.pop("num_partitions", None)
    if seed is not None and _accepts_seed(node):
        if node.get("seed", seed) != seed:
            log.warning("partition.seed=%s overridden by partition_seed=%s", node["seed"], seed)
        node["seed"] = seed
    return instantiate(node, "partition.partitioner", num_partitions=num_partitions)


def partition_indices(
    labels: np.ndarray, partitioner: Any, num_partitions: int
) -> list[np.ndarray]:
    """Run ``partitioner`` over ``labels``; return the sorted row indices of each partition.

    Raises
    ------
    ConfigError
        If the partitioner fails on this data or leaves a partition empty.
    """
    import datasets

    name = type(partitioner).__name__
    ds = datasets.Dataset.from_dict(
        {"label": np.asarray(labels, dtype=np.int64), "idx": np.arange(len(labels))}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            partitioner.dataset = ds
            parts = [
                np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
                for i in range(num_partitions)
            ]
        except Exception as err:
            message = _explain_failure(partitioner, num_partitions, len(labels), err)
            raise ConfigError(message) from err
    for warning in caught:
        log.warning("%s: %s", name, warning.message)
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ConfigError(
            f"partition: {name} left client(s) {empty} without data ({len(labels)} rows, "
            f"{num_partitions} clients); use fewer clients or a less skewed partition"
        )
    return parts


def partition_hash(parts: list[np.ndarray]) -> str:
    """SHA-256 over the index arrays in order (length-prefixed), first 16 hex characters."""
    digest = hashlib.sha256()
    for part in parts:
        part = np.ascontiguousarray(part, dtype=np.int64)
        digest.update(np.int64(len(part)).tobytes())
        digest.update(part.tobytes())
    return digest.hexdigest()[:16]


def class_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-partition class counts, shape ``[P, C]``."""
    return np.stack(
        [np.bincount(labels[part], minlength=num_classes)[:num_classes] for part in parts]
    ).astype(np.int64)


def _check_counts(num_partitions: int, num_samples: int) -> None:
    if not _is_int(num_partitions) or num_partitions < 1:
        raise ConfigError("num_clients", num_partitions, "must be an int >= 1")
    if num_partitions > num_samples:
        raise ConfigError(
            f"num_clients={num_partitions} exceeds the {num_samples} private samples; "
            f"use fewer clients or a smaller dataset.public_size"
        )


def _check_alpha(alpha: Any) -> None:
    if alpha is None:
        return
    values = alpha if isinstance(alpha, (list, tuple)) else [alpha]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not values or not numeric or min(values) <= 0:
        raise ConfigError("partition.partitioner.alpha", alpha,
                          "must be a number > 0 (or a list of them)")


def _check_classes_per_partition(k: Any, num_classes: int | None) -> None:
    if k is None:
        return
    upper = num_classes if num_classes is not None else k
    if not _is_int(k) or not 1 <= k <= upper:
        allowed = f"1..{num_classes}" if num_classes is not None else ">= 1"
        raise ConfigError("partition.partitioner.num_classes_per_partition", k,
                          f"must be an int in {allowed}")


def _check_min_size(min_size: Any, num_partitions: int, num_samples: int) -> None:
    if min_size is None:
        return
    if not _is_int(min_size) or min_size < 0:
        raise ConfigError("partition.partitioner.min_partition_size", min_size, "must be an int >= 0")
    if min_size * num_partitions > num_samples:
        raise ConfigError(_too_few_rows(num_partitions, int(min_size), num_samples))


def _too_few_rows(num_partitions: int, min_size: int, num_samples: int) -> str:
    """Why a partition cannot give every client ``min_size`` rows: there are too few in all."""
    return (
        f"partition: {num_partitions} clients x min_partition_size={min_size} needs "
        f"{num_partitions * min_size} private rows, but only {num_samples} private rows remain "
        f"after the test and public rows; use fewer clients (num_clients), a smaller "
        f"partition.partitioner.min_partition_size, a smaller dataset.public_size or more data"
    )


def _draws_failed(num_partitions: int, min_size: int, num_samples: int, alpha: Any,
                  self_balancing: bool) -> str:
    """Why a Dirichlet partition failed although the rows suffice in total."""
    balance = "" if self_balancing else ", partition.partitioner.self_balancing=true"
    return (
        f"partition: {num_partitions} clients x min_partition_size={min_size} needs "
        f"{num_partitions * min_size} of the {num_samples} private rows "
        f"({num_samples / num_partitions:.1f} per client on average): enough in total, but "
        f"every Dirichlet draw (alpha={alpha}) left a client with fewer; use a larger "
        f"partition.partitioner.alpha{balance}, fewer clients (num_clients), a smaller "
        f"partition.partitioner.min_partition_size or more data"
    )


def _explain_failure(partitioner: Any, num_partitions: int, num_samples: int, err: Exception) -> str:
    """A one-line ConfigError message for a partitioner's failure on ``num_samples`` rows.

    flwr-datasets' DirichletPartitioner gives up after repeated draws that leave a client under
    ``min_partition_size`` rows and blames alpha; the counts tell whether rows are simply too
    few. Its settings are private attributes (flwr-datasets 0.6), read only to explain.
    """
    name = type(partitioner).__name__
    min_size = getattr(partitioner, "_min_partition_size", None)
    if "max number of attempts" not in str(err) or not _is_int(min_size):
        return f"partition: {name} failed on {num_samples} rows: {err}"
    if min_size * num_partitions > num_samples:
        return _too_few_rows(num_partitions, int(min_size), num_samples)
    alphas = np.unique(np.asarray(getattr(partitioner, "_alpha", np.nan), dtype=float)).tolist()
    alpha = alphas[0] if len(alphas) == 1 else alphas
    balancing = bool(getattr(partitioner, "_self_balancing", False))
    return _draws_failed(num_partitions, int(min_size), num_samples, alpha, balancing)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _accepts_seed(node: Mapping[str, Any]) -> bool:
    """Whether the ``_target_`` callable takes a ``seed`` argument."""
    return "seed" in node or "seed" in _parameters(node)


def _default_argument(node: Mapping[str, Any], key: str) -> Any:
    """The default of the ``_target_`` callable's argument ``key`` (None if it has none)."""
    param = _parameters(node).get(key)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _parameters(node: Mapping[str, Any]) -> Mapping[str, inspect.Parameter]:
    """The ``_target_`` callable's parameters (empty if it has no signature)."""
    from hydra.utils import get_object

    try:
        target = get_object(node["_target_"])
    except Exception as err:
        raise ConfigError(
            f"partition.partitioner._target_='{node['_target_']}' cannot be imported: {err}"
        ) from err
    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
