"""The on-disk form of prepared data: :class:`DataInfo`, atomic writes and the loaders.

A cache directory holds ``public.npz`` (inputs only: no public labels anywhere),
``test.npz``, ``client_<i>.npz``, ``own_test.npz`` (each client's own-label test chunk) and
``meta.json`` (the :class:`DataInfo`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.errors import ConfigError

log = logging.getLogger(__name__)

META = "meta.json"


@dataclass(frozen=True)
class DataInfo:
    """What every node needs to know about the prepared data (JSON-serialisable)."""

    cache_dir: str
    num_classes: int
    input_shape: tuple[int, ...]
    public_fingerprint: str
    partition_hash: str
    num_public: int
    num_test: int
    client_sizes: tuple[int, ...]
    class_histograms: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with lists instead of tuples."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(
            cache_dir=str(data["cache_dir"]),
            num_classes=int(data["num_classes"]),
            input_shape=tuple(int(d) for d in data["input_shape"]),
            public_fingerprint=str(data["public_fingerprint"]),
            partition_hash=str(data["partition_hash"]),
            num_public=int(data["num_public"]),
            num_test=int(data["num_test"]),
            client_sizes=tuple(int(n) for n in data["client_sizes"]),
            class_histograms=tuple(tuple(int(c) for c in row) for row in data["class_histograms"]),
        )


def fingerprint(x: np.ndarray) -> str:
    """SHA-256 of the shape and float32 C-contiguous bytes of ``x``, first 16 hex characters."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    digest = hashlib.sha256(str(tuple(x.shape)).encode())
    digest.update(x.tobytes())
    return digest.hexdigest()[:16]


def load_public(cache_dir: str | Path) -> np.ndarray:
    """The public (unlabelled) inputs."""
    return _load(Path(cache_dir) / "public.npz")["x"]


def load_test(cache_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The test inputs and labels."""
    data = _load(Path(cache_dir) / "test.npz")
    return data["x"], data["y"]


def load_client(cache_dir: str | Path, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One client's private inputs and labels."""
    file = Path(cache_dir) / f"client_{partition_id}.npz"
    if not file.is_file():
        num_clients = len(read_meta(Path(cache_dir)).client_sizes)
        raise ConfigError(
            f"partition_id={partition_id} is out of range: the data in {cache_dir} has "
            f"clients 0..{num_clients - 1}"
        )
    data = _load(file)
    return data["x"], data["y"]


OWN_TEST = "own_test.npz"
"""The clients' own-label test chunks (`fedkd.data.limits`): ``client_<i>`` -> test row indices.
A file of its own, so reading a chunk never loads a client's private rows."""


def load_own_test(cache_dir: str | Path, partition_id: int) -> np.ndarray | None:
    """Indices into the test set of a client's own-label chunk, if the cache has chunks."""
    file = Path(cache_dir) / OWN_TEST
    return load_npz(file).get(f"client_{partition_id}") if file.is_file() else None


def load_private_pool(cache_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All clients' private rows concatenated in client order (centralised baseline)."""
    num_clients = len(read_meta(Path(cache_dir)).client_sizes)
    parts = [load_client(cache_dir, i) for i in range(num_clients)]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def write_atomically(
    cache_dir: Path, arrays: Mapping[str, Mapping[str, np.ndarray]], info: DataInfo
) -> None:
    """Write into a temporary sibling directory, then rename it into place."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        for name, content in arrays.items():
            np.savez(tmp / name, **content)
        (tmp / META).write_text(json.dumps(info.to_dict(), indent=2))
        if cache_dir.exists() and not (cache_dir / META).is_file():
            log.warning("Removing incomplete cache directory %s", cache_dir)
            shutil.rmtree(cache_dir, ignore_errors=True)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not (cache_dir / META).is_file():
                raise
            log.info("Another process prepared %s first; using its files", cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_files(info: DataInfo) -> list[str]:
    """The array files a cache directory described by `info` holds."""
    clients = [f"client_{i}.npz" for i in range(len(info.client_sizes))]
    return ["public.npz", "test.npz", OWN_TEST, *clients]


def unreadable_file(cache_dir: Path, info: DataInfo) -> tuple[Path, str] | None:
    """The first of the cache's array files that fails to load, and why; None if all load.

    Each file is loaded in full (``load_npz``), so a truncated or corrupt archive is found here,
    once, rather than by a client in every round.
    """
    for name in cache_files(info):
        file = cache_dir / name
        try:
            arrays = _load(file)
        except ConfigError as err:
            return file, str(err)
        expected = {"x"} if name == "public.npz" else set() if name == OWN_TEST else {"x", "y"}
        if not expected <= arrays.keys():
            return file, f"'{file}' lacks the arrays {sorted(expected - arrays.keys())}"
    return None


def discard(cache_dir: Path) -> None:
    """Remove a cache directory: renamed aside first, so no reader ever sees it half deleted."""
    aside = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.discarded.", dir=cache_dir.parent))
    try:
        os.rename(cache_dir, aside / cache_dir.name)
    except FileNotFoundError:  # another process discarded it first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def read_meta(cache_dir: Path) -> DataInfo:
    file = cache_dir / META
    if not file.is_file():
        raise ConfigError(f"no prepared data in '{cache_dir}' ({META} missing)")
    info = DataInfo.from_dict(json.loads(file.read_text()))
    return replace(info, cache_dir=str(cache_dir))


def _load(file: Path) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise ConfigError(f"prepared data file '{file}' is missing; run prepare_data first")
    return load_npz(file)


_NPZ_ERRORS = (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, KeyError)
"""What numpy raises on a file that is not a clean archive of arrays (never shown as is: its
message for pickled data suggests loading it unsafely)."""


def load_npz(file: str | Path, key: str | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive, loaded with ``allow_pickle=False``.

    Parameters
    ----------
    file : str or Path
        The archive.
    key : str, optional
        The setting the path came from, named in the error message.

    Raises
    ------
    ConfigError
        ``not a valid .npz file: <path>`` when the file is no archive of plain numeric arrays (a
        pickle, an ``.npy``, a truncated or corrupt zip, object arrays, a non-array member).
    """
    path = Path(file).expanduser()
    where = f"{key}: " if key else ""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("an array file, not an archive")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
        if not all(isinstance(a, np.ndarray) for a in arrays.values()):
            raise ValueError("a member is not an array")
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise ConfigError(f"{where}cannot read '{path}': {err.strerror}") from None
    except _NPZ_ERRORS:
        raise ConfigError(f"{where}not a valid .npz file: {path} (expected numeric arrays saved "
                          f"by numpy.savez; Python objects are never loaded)") from None
    return arrays
