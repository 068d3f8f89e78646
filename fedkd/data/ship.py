"""Prepared data on nodes that do not share the driver's disk (a Ray cluster).

The driver prepares the data once (`fedkd.data.prepare.prepare_data`) and, on a Ray cluster,
`publish`es the cache folder's files: each file goes into Ray's object store (``ray.put``,
owned by the driver, so it lives as long as the run) and a named actor (`CacheFiles`, no CPU)
hands out their object refs. A client calls `ensure_cache` with the data its settings announce:
the folder it returns holds the same bytes as the driver's. A node keeps its copy in
``$FEDKD_NODE_CACHE_DIR/<key>`` when that variable is set in its environment (set it where
``ray start`` runs on the node), else at the driver's own path (a shared disk, or the driver's
node). A missing copy is fetched once per node (a file lock; written aside, then renamed) and
checked against the announced partition hash and public fingerprint.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedkd.data.cache import META, cache_files, discard, read_meta, unreadable_file
from fedkd.errors import ConfigError

log = logging.getLogger(__name__)

NODE_CACHE_ENV = "FEDKD_NODE_CACHE_DIR"
"""Environment variable of a node: the folder it keeps its copies of prepared data in."""
ACTOR_PREFIX = "fedkd-data-"
"""Name of the actor that ships a cache folder: this prefix and the folder's name (its key)."""


class CacheFiles:
    """A Ray actor (``num_cpus=0``) holding the object refs of one cache folder's files."""

    def __init__(self, refs: dict[str, Any]) -> None:
        self._refs = refs  # refs nested in a dict are passed as refs, never fetched here

    def refs(self) -> dict[str, Any]:
        """File name -> object ref of the file's bytes."""
        return self._refs


def actor_name(cache_dir: str | Path) -> str:
    """The name of the actor that ships `cache_dir` (unique per data config in a Ray job)."""
    return ACTOR_PREFIX + Path(cache_dir).name


def publish(cache_dir: str | Path) -> Any:
    """Put a prepared cache folder's files into Ray's object store; return the actor serving
    them (keep the handle while the simulation runs: the actor dies with the last handle)."""
    import ray

    folder = Path(cache_dir)
    info = read_meta(folder)
    names = [META, *cache_files(info)]
    refs = {name: ray.put((folder / name).read_bytes()) for name in names}
    size = sum((folder / name).stat().st_size for name in names)
    actor = ray.remote(num_cpus=0)(CacheFiles).options(name=actor_name(folder)).remote(refs)
    log.info("prepared data %s shipped through Ray's object store (%d files, %.1f MB)",
             folder.name, len(names), size / 1e6)
    return actor


def node_cache_dir(announced: str | Path) -> Path:
    """Where this node reads the data the driver prepared in `announced`."""
    root = os.environ.get(NODE_CACHE_ENV)
    return Path(root).expanduser() / Path(announced).name if root else Path(announced)


def ensure_cache(data: Mapping[str, Any]) -> str:
    """The folder this node reads the announced prepared data from, fetched first if missing.

    Parameters
    ----------
    data : Mapping
        `ClientSettings.data` (`fedkd.data.DataInfo` as a dict): ``cache_dir``,
        ``partition_hash`` and ``public_fingerprint`` are used.

    Raises
    ------
    ConfigError
        When the data is not on this node and no driver ships it, or the copy differs.
    """
    return _ensure(str(data["cache_dir"]), str(data["partition_hash"]),
                   str(data["public_fingerprint"]))


@lru_cache(maxsize=8)
def _ensure(announced: str, partition_hash: str, public_fingerprint: str) -> str:
    local = node_cache_dir(announced)
    expected = (partition_hash, public_fingerprint)
    if _holds(local, expected):
        return str(local)
    try:
        with _locked(local):
            if not _holds(local, expected):  # another worker of this node may have fetched it
                _fetch(announced, local, expected)
    except ConfigError:
        if (local / META).is_file():  # data of another run here and nothing shipped: the
            return str(local)         # client's own check names the mismatch (PublicSetMismatch)
        raise
    except OSError as err:
        raise ConfigError(f"cannot keep prepared data in '{local}' on this node ({err}); set "
                          f"{NODE_CACHE_ENV} to a writable folder where `ray start` runs on "
                          f"it") from err
    return str(local)


def _holds(folder: Path, expected: tuple[str, str]) -> bool:
    """Whether `folder` is a complete cache of the announced data (written whole or not at all)."""
    if not (folder / META).is_file():
        return False
    info = read_meta(folder)
    return (info.partition_hash, info.public_fingerprint) == expected


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock beside `folder`, held by one process of this machine at a time."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch(announced: str, local: Path, expected: tuple[str, str]) -> None:
    """Copy the driver's files of `announced` into `local`, and check them."""
    files = shipped_files(announced)
    if files is None:
        where = f" ({NODE_CACHE_ENV}={os.environ[NODE_CACHE_ENV]})" if NODE_CACHE_ENV in \
            os.environ else ""
        raise ConfigError(f"no prepared data in '{local}' on this node{where}, and no Ray "
                          f"driver ships '{Path(announced).name}' (actor {actor_name(announced)})")
    if any(Path(name).name != name or name.startswith(".") for name in files) or META not in files:
        raise ConfigError(f"the shipped data {Path(announced).name} has unexpected file names "
                          f"{sorted(files)}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        if local.exists():  # incomplete, or another data set's: never read, replaced whole
            discard(local)
        os.rename(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = read_meta(local)
    broken = unreadable_file(local, info)
    if broken is not None or (info.partition_hash, info.public_fingerprint) != expected:
        discard(local)
        raise ConfigError(f"the data shipped to '{local}' is not the announced one "
                          f"({broken[1] if broken else 'partition hash or public fingerprint'})")
    log.info("prepared data %s fetched from the driver into %s (%d files)", local.name, local,
             len(files))


def shipped_files(announced: str) -> dict[str, bytes] | None:
    """The bytes of each file the driver ships for `announced`; None outside Ray, or when no
    actor ships it (a plain local run, whose clients read the driver's folder)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    try:
        actor = ray.get_actor(actor_name(announced))
    except ValueError:
        return None
    refs = ray.get(actor.refs.remote())
    return dict(zip(refs, ray.get(list(refs.values()))))
