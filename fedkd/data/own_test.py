"""The clients' own-label test chunks (``own_test.npz``), read one client at a time.

The archive holds one small array per client. `fedkd.data.cache.load_own_test` reads the whole
archive to return one chunk: fine for a few clients, O(clients) per call (about 0.35 ms per
member) at many, and O(clients^2) for a loop over all of them (minutes at 1,000 clients, hours
at 10,000). `OwnTestChunks` opens the archive once and reads only the member asked for.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedkd.data.cache import OWN_TEST, load_npz, load_own_test

__all__ = ["OwnTestChunks", "own_test_chunks", "own_test_sizes"]


class OwnTestChunks:
    """``own_test.npz`` of one cache folder, opened once; `get` reads one member.

    Anything unexpected (a missing file, a bad archive or member) is left to `load_own_test`,
    which raises the checked loader's error.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir, self.lock = str(cache_dir), threading.Lock()
        self.archive: np.lib.npyio.NpzFile | None = None
        try:
            archive = np.load(Path(cache_dir) / OWN_TEST, allow_pickle=False)
            if isinstance(archive, np.lib.npyio.NpzFile):
                self.archive = archive
        except Exception:  # noqa: BLE001  (missing or unreadable: `get` asks the checked loader)
            pass
        self.names = frozenset(self.archive.files) if self.archive is not None else frozenset()

    def get(self, partition_id: int) -> np.ndarray | None:
        """Indices into the test set of a client's chunk; None if the cache has none for it."""
        if self.archive is None:
            return load_own_test(self.cache_dir, partition_id)
        name = f"client_{partition_id}"
        try:
            with self.lock:  # one zip file object: reads must not interleave
                chunk = self.archive[name] if name in self.names else None
        except Exception:  # noqa: BLE001  (the checked loader says what is wrong)
            return load_own_test(self.cache_dir, partition_id)
        if chunk is not None and not isinstance(chunk, np.ndarray):
            return load_own_test(self.cache_dir, partition_id)
        return chunk


@lru_cache(maxsize=8)
def own_test_chunks(cache_dir: str) -> OwnTestChunks:
    """The chunks of a cache folder, opened once per process (the folder never changes: its
    name is a hash of what it holds)."""
    return OwnTestChunks(cache_dir)


def own_test_sizes(cache_dir: str | Path, num_clients: int) -> list[int] | None:
    """Rows of each client's chunk, reading the archive once; None if any client has none.

    Raises `fedkd.errors.ConfigError` for a missing or unreadable archive."""
    chunks = load_npz(Path(cache_dir) / OWN_TEST)
    names = [f"client_{i}" for i in range(num_clients)]
    return None if any(n not in chunks for n in names) else [len(chunks[n]) for n in names]
