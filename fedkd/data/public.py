"""The public transfer set in deployment: read from a file, or rebuilt from an embedded source.

In deployment nobody ships the public set: the server and every SuperNode hold the same raw
public rows, either as a file or as an *embedded* name (a source bundled with fedkd, cut exactly
as ``fedkd-sim dataset=<name>`` cuts its public rows). Each side normalises them with their own
statistics (`fedkd.data.split.normalizer`) and fingerprints the result; a node whose fingerprint
differs from the one the server announces refuses to distil (`PublicSetMismatch`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.data.cache import DataInfo, fingerprint, load_npz, write_atomically
from fedkd.data.raw import RawData, check_features
from fedkd.errors import ConfigError

log = logging.getLogger(__name__)

PUBLIC_SUFFIXES = (".npz", ".parquet", ".csv")


def _digits() -> RawData:
    from fedkd.data.sources import digits

    return digits()


def _mnist1d(num_samples: int = 5000, seed: int = 42) -> RawData:
    from fedkd.data.sources import mnist1d

    return mnist1d(num_samples=num_samples, seed=seed)


EMBEDDED: dict[str, Callable[..., RawData]] = {"digits": _digits, "mnist1d": _mnist1d}
"""Embedded public sets: name -> offline source (no file, no download)."""


def is_embedded(public: str) -> bool:
    """Whether `public` names an embedded source rather than a file."""
    return public in EMBEDDED and not Path(public).expanduser().is_file()


def read_public_file(path: str, key: str, label_column: str = "label") -> np.ndarray:
    """Raw public inputs from ``.npz`` (array ``x``; others ignored) or a table (numeric columns;
    a ``label_column``, if present, is dropped: the public set is used without labels)."""
    file = Path(path).expanduser()
    if file.suffix.lower() not in PUBLIC_SUFFIXES:
        raise ConfigError(f"{key}='{path}': unknown file extension '{file.suffix}'; "
                          f"allowed: {', '.join(PUBLIC_SUFFIXES)}")
    if not file.is_file():
        raise ConfigError(f"{key}='{path}': file not found")
    if file.suffix.lower() == ".npz":
        archive = load_npz(file, f"{key}='{path}'")
        if "x" not in archive:
            raise ConfigError(f"{key}='{path}': a public .npz needs an array 'x', "
                              f"found {sorted(archive)}")
        x = archive["x"]
    else:
        import pandas as pd

        frame = pd.read_parquet(file) if file.suffix.lower() == ".parquet" else pd.read_csv(file)
        frame = frame.drop(columns=[label_column], errors="ignore")
        x = frame.to_numpy()
    if len(x) == 0:
        raise ConfigError(f"{key}='{path}': the public set is empty")
    return check_features(x, len(x), f"{key}='{path}'")


def embedded_recipe(name: str, dataset_cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """How the server cuts an embedded public set: `dataset_cfg` is ``conf/dataset/<name>.yaml``."""
    if name not in EMBEDDED:
        raise ConfigError(f"'{name}' is not an embedded public set; allowed: {sorted(EMBEDDED)}")
    args = {k: v for k, v in dict(dataset_cfg.get("source") or {}).items() if k != "_target_"}
    return {"name": name, "args": args, "test_fraction": dataset_cfg.get("test_fraction"),
            "public_size": dataset_cfg.get("public_size"), "seed": int(seed)}


def embedded_public(recipe: Mapping[str, Any], cache_root: str | Path | None = None) -> np.ndarray:
    """The raw public rows a recipe names (cached under ``<cache_root>/public`` if given).

    Only the fixed `EMBEDDED` sources run, with scalar arguments: a recipe arrives over the wire.
    """
    name = str(recipe.get("name"))
    if name not in EMBEDDED:
        raise ConfigError(f"embedded public set '{name}' is unknown; allowed: {sorted(EMBEDDED)}")
    args = dict(recipe.get("args") or {})
    bad = {k: v for k, v in args.items() if not isinstance(v, int | float | str | bool)}
    if bad:
        raise ConfigError(f"embedded public set '{name}': arguments must be scalars, got {bad}")
    known = set(inspect.signature(EMBEDDED[name]).parameters)
    if unknown := sorted(set(args) - known):
        raise ConfigError(f"embedded public set '{name}': unknown argument(s) {unknown}; "
                          f"allowed: {sorted(known)}")
    key = hashlib.sha256(json.dumps(dict(recipe), sort_keys=True).encode()).hexdigest()[:16]
    file = Path(cache_root).expanduser() / "public" / f"{name}-{key}.npz" if cache_root else None
    if file is not None and file.is_file():
        try:
            return load_npz(file)["x"]
        except (ConfigError, KeyError):
            log.warning("Rebuilding the unreadable cached public set %s", file)
    from fedkd.data.split import split_data

    split = split_data(EMBEDDED[name](**args), recipe["test_fraction"], recipe["public_size"],
                       int(recipe["seed"]))
    if file is not None:
        _save_atomically(file, split.public_x)
    return split.public_x


def _save_atomically(file: Path, x: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.stem}.", suffix=".npz", dir=file.parent)
    os.close(fd)
    try:
        np.savez(tmp, x=x)
        os.replace(tmp, file)
    finally:
        Path(tmp).unlink(missing_ok=True)


def prepare_public(
    public: str,
    normalize: str,
    num_classes: int,
    cache_root: str | Path,
    recipe: Mapping[str, Any] | None = None,
) -> tuple[DataInfo, dict[str, Any]]:
    """Server side of deployment: the public set alone, normalised, fingerprinted and cached.

    Returns the `DataInfo` (no private data: no client sizes, no test rows) and what nodes need
    to rebuild the same public set: ``normalize`` and, for an embedded set, ``public_recipe``.
    """
    from fedkd.data.split import normalizer

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError("dataset.num_classes", num_classes, "must be an int >= 2")
    raw = (embedded_public(recipe, cache_root) if recipe is not None
           else read_public_file(public, "dataset.public"))
    public_x = normalizer(raw, normalize)(raw)
    digest = fingerprint(public_x)
    cache_dir = Path(cache_root).expanduser().resolve() / f"public-{digest}"
    info = DataInfo(
        cache_dir=str(cache_dir), num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in public_x.shape[1:]), public_fingerprint=digest,
        partition_hash="on-nodes", num_public=len(public_x), num_test=0, client_sizes=(),
        class_histograms=(),
    )
    if not (cache_dir / "public.npz").is_file():  # named by its fingerprint: same rows inside
        write_atomically(cache_dir, {"public.npz": {"x": public_x}}, info)
    log.info("Public set %s: %d rows, input %s, normalised '%s', fingerprint %s", public,
             info.num_public, info.input_shape, normalize, digest)
    return info, {"normalize": normalize, "public_recipe": dict(recipe) if recipe else None}
