"""Entry point of the data layer: build (or reuse) the cached split and partition.

The server calls :func:`prepare_data` once; it writes ``public.npz`` (inputs only, no labels),
``test.npz``, ``client_<i>.npz``, ``own_test.npz`` (the own-label test chunks) and
``meta.json`` into a directory named by a hash of the config, so every process (and every
compared run) reads exactly the same rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.compact import brief
from fedkd.data._config import instantiate, require_target, to_plain
from fedkd.data.cache import (
    META,
    OWN_TEST,
    DataInfo,
    fingerprint,
    load_client,
    load_private_pool,
    load_public,
    load_test,
    discard,
    read_meta,
    unreadable_file,
    write_atomically,
)
from fedkd.data.partition import (
    class_histograms,
    make_partitioner,
    partition_hash,
    partition_indices,
)
from fedkd.data.limits import check_limit, own_label_chunks, per_class_subset
from fedkd.data.raw import RawData
from fedkd.data.split import normalize, split_data
from fedkd.errors import ConfigError

log = logging.getLogger(__name__)
PER_CLIENT_LINES = 20
"""Clients up to which each one's class histogram is logged at INFO (above: DEBUG)."""

CACHE_VERSION = 3
"""Bump when the cache layout or the preparation logic changes."""

__all__ = [
    "DataInfo",
    "cache_key",
    "fingerprint",
    "load_client",
    "load_private_pool",
    "load_public",
    "load_test",
    "prepare_data",
]


def prepare_data(
    dataset_cfg: Mapping[str, Any],
    partition_cfg: Mapping[str, Any],
    num_clients: int,
    partition_seed: int,
    cache_root: str | Path,
) -> DataInfo:
    """Load, split, normalise and partition a data set, caching the result on disk.

    Parameters
    ----------
    dataset_cfg : Mapping
        The ``dataset`` node: ``source`` (a ``_target_`` node), ``test_fraction``,
        ``public_size``, ``normalize``.
    partition_cfg : Mapping
        The ``partition.partitioner`` node (a ``_target_`` node).
    num_clients : int
        Number of partitions.
    partition_seed : int
        Seeds the split and the partitioner (overriding any ``seed`` in ``partition_cfg``).
    cache_root : str | Path
        Parent directory of the cache directories.
    """
    dataset = to_plain(dataset_cfg)
    if not isinstance(dataset, dict):
        raise ConfigError(f"dataset must be a config mapping, got {dataset!r}")
    source = require_target(dataset.get("source"), "dataset.source")
    partition = require_target(partition_cfg, "partition.partitioner")
    cache_dir = Path(cache_root).expanduser().resolve() / cache_key(
        dataset, partition, num_clients, partition_seed
    )
    info = None
    if (cache_dir / META).is_file():
        info = read_meta(cache_dir)
        broken = unreadable_file(cache_dir, info)
        if broken is None:
            log.info("Reusing prepared data in %s", cache_dir)
        else:
            log.warning("prepared data file %s fails to load (%s); preparing the data again",
                        *broken)
            discard(cache_dir)
            info = None
    if info is None:
        info, arrays = _build(dataset, source, partition, num_clients, partition_seed, cache_dir)
        write_atomically(cache_dir, arrays, info)
        info = read_meta(cache_dir)  # another process may have written it first
        broken = unreadable_file(cache_dir, info)
        if broken is not None:
            raise ConfigError(f"prepared data file {broken[0]} fails to load even after it was "
                              f"written again ({broken[1]})")
    _log_summary(info)
    return info


def cache_key(
    dataset_cfg: Mapping[str, Any],
    partition_cfg: Mapping[str, Any],
    num_clients: int,
    partition_seed: int,
) -> str:
    """Hash of everything the prepared data depends on (incl. size/mtime of source files)."""
    payload = {
        "version": CACHE_VERSION,
        "dataset": dataset_cfg,
        "partition": partition_cfg,
        "num_clients": num_clients,
        "partition_seed": partition_seed,
        "files": _file_stamps(dataset_cfg.get("source", {})),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build(
    dataset: Mapping[str, Any],
    source: Mapping[str, Any],
    partition: Mapping[str, Any],
    num_clients: int,
    seed: int,
    cache_dir: Path,
) -> tuple[DataInfo, dict[str, dict[str, np.ndarray]]]:
    """Run the pipeline; return the info and the arrays of each cache file."""
    raw = instantiate(source, "dataset.source")
    if not isinstance(raw, RawData):
        target = source["_target_"]
        raise ConfigError(f"dataset.source '{target}' must return RawData, got {type(raw)}")
    split = split_data(raw, dataset.get("test_fraction"), dataset.get("public_size"), seed)
    split = normalize(split, dataset.get("normalize", "none"))
    max_class = check_limit(dataset.get("max_class_rows"), "max_class_rows")
    if max_class is not None:
        keep = per_class_subset(split.private_y, max_class, seed + 2)
        log.info("Private pool capped at %d rows per class: %d of %d rows "
                 "(dataset.max_class_rows)", max_class, len(keep), len(split.private_y))
        split = replace(split, private_x=split.private_x[keep], private_y=split.private_y[keep],
                        private_ids=split.private_ids[keep])
    partitioner = make_partitioner(
        partition, num_clients, len(split.private_y), seed=seed, num_classes=raw.num_classes
    )
    parts = partition_indices(split.private_y, partitioner, num_clients)
    unassigned = len(split.private_y) - sum(len(p) for p in parts)
    if unassigned:
        log.warning("The partitioner left %d private rows unassigned", unassigned)
    info = DataInfo(
        cache_dir=str(cache_dir),
        num_classes=raw.num_classes,
        input_shape=raw.input_shape,
        public_fingerprint=fingerprint(split.public_x),
        partition_hash=partition_hash([split.private_ids[p] for p in parts]),
        num_public=len(split.public_x),
        num_test=len(split.test_y),
        client_sizes=tuple(len(p) for p in parts),
        class_histograms=tuple(
            tuple(int(c) for c in row)
            for row in class_histograms(split.private_y, parts, raw.num_classes)
        ),
    )
    arrays = {
        "public.npz": {"x": split.public_x},
        "test.npz": {"x": split.test_x, "y": split.test_y},
    }
    chunks = own_label_chunks(split.test_y, np.array(info.class_histograms), seed + 4)
    arrays[OWN_TEST] = {f"client_{i}": chunk for i, chunk in enumerate(chunks)}
    for i, part in enumerate(parts):
        arrays[f"client_{i}.npz"] = {"x": split.private_x[part], "y": split.private_y[part]}
    return info, arrays


def _file_stamps(source: Mapping[str, Any]) -> dict[str, list[int]]:
    """Size and mtime of every existing file named by a string value of the source node."""
    stamps = {}
    for value in source.values():
        if isinstance(value, str) and Path(value).expanduser().is_file():
            stat = Path(value).expanduser().stat()
            stamps[value] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _log_summary(info: DataInfo) -> None:
    log.info(
        "Data: %d classes, input %s, %d public (fingerprint %s), %d test, partition hash %s, "
        "client sizes %s",
        info.num_classes, info.input_shape, info.num_public, info.public_fingerprint,
        info.num_test, info.partition_hash, brief(list(info.client_sizes)),
    )
    many = len(info.client_sizes) > PER_CLIENT_LINES  # thousands of clients: at debug level
    for i, hist in enumerate(info.class_histograms):
        log.log(logging.DEBUG if many else logging.INFO, "client %d: %d rows, class histogram %s",
                i, info.client_sizes[i], list(hist))
