"""What a SuperNode says about itself: its node config, read and checked.

In simulation Flower sets only ``partition-id`` and ``num-partitions``; the data comes from the
server-prepared cache. A deployed SuperNode is started with its own keys::

    flower-supernode ... --node-config 'partition-id=0 data-path="/data/train.npz"
        test-path="/data/test.npz" public-path="/data/public.npz" arch="mlp" role="student"'

``data-path`` switches the node to its own files. Every key is listed in `NODE_KEYS`; any other
key is refused with the list, so a typo (``data_path``) fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fedkd.settings import ClientSettings
from fedkd.errors import ConfigError

NODE_KEYS = {
    "partition-id": "this node's id in the federation, 0..num_clients-1 (seeds, order, results)",
    "num-partitions": "set by Flower's simulation; ignored",
    "data-path": "private labelled data: .npz (x, y) or .parquet/.csv (label column + features)",
    "test-path": "labelled test data in the same format (default: hold out test-fraction)",
    "test-fraction": "share of data-path rows held out for testing without test-path (0.2)",
    "label-column": "label column of .parquet/.csv files (label)",
    "public-path": "the public transfer set as a file: .npz (x) or .parquet/.csv (features)",
    "public": "the public transfer set as an embedded name (digits, mnist1d)",
    "arch": "this node's architecture: a name from the run's model.archs",
    "role": "student (digests soft targets) or teacher (never taught)",
    "checkpoint-dir": "where the student is checkpointed (default <cache>/checkpoints)",
}
ROLES = ("student", "teacher")


def cache_root() -> Path:
    """``$FEDKD_CACHE_DIR``, else ``~/.cache/fedkd``."""
    return Path(os.environ.get("FEDKD_CACHE_DIR") or Path.home() / ".cache" / "fedkd")


@dataclass(frozen=True)
class NodeConfig:
    """A node's config, checked (see `NODE_KEYS`)."""

    partition_id: int
    data_path: str | None = None
    test_path: str | None = None
    test_fraction: float = 0.2
    label_column: str = "label"
    public_path: str | None = None
    public: str | None = None
    arch: str | None = None
    role: str | None = None
    checkpoint_dir: str | None = None

    @property
    def deployed(self) -> bool:
        """Whether the node reads its own files (deployment) rather than the prepared cache."""
        return self.data_path is not None

    @property
    def checkpoints(self) -> Path | None:
        """Folder of this node's checkpoints (deployment only)."""
        if not self.deployed:
            return None
        return Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else (
            cache_root() / "checkpoints")

    @classmethod
    def from_context(cls, context: Context) -> NodeConfig:
        """Read and check ``context.node_config``."""
        config = dict(context.node_config)
        unknown = sorted(set(config) - set(NODE_KEYS))
        if unknown:
            raise ConfigError(f"node config key(s) {unknown} unknown; allowed: {sorted(NODE_KEYS)}")
        if "partition-id" not in config:
            raise ConfigError("node config has no 'partition-id' (an int, 0..num_clients-1)")
        pid = config["partition-id"]
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
            raise ConfigError(f"node config partition-id must be an int >= 0, got {pid!r}")
        strings = {key: _string(config, key) for key in NODE_KEYS if key not in
                   ("partition-id", "num-partitions", "test-fraction")}
        node = cls(
            partition_id=pid, data_path=strings["data-path"], test_path=strings["test-path"],
            test_fraction=_fraction(config.get("test-fraction", 0.2)),
            label_column=strings["label-column"] or "label", public_path=strings["public-path"],
            public=strings["public"], arch=strings["arch"], role=strings["role"],
            checkpoint_dir=strings["checkpoint-dir"],
        )
        node.check()
        return node

    def check(self) -> None:
        """Cross-key rules: files only with data-path, exactly one public source, known role."""
        if self.role is not None and self.role not in ROLES:
            raise ConfigError(f"node config role={self.role!r} is not a role; "
                              f"allowed: {list(ROLES)}")
        if not self.deployed:
            files = (("test-path", self.test_path), ("public-path", self.public_path),
                     ("public", self.public))
            stray = [key for key, value in files if value is not None]
            if stray:
                raise ConfigError(f"node config sets {stray} but no data-path; a deployed node "
                                  f"needs data-path (its private data file)")
            return
        if (self.public_path is None) == (self.public is None):
            raise ConfigError("node config needs exactly one of public-path (a file) or public "
                              f"(an embedded name), got public-path={self.public_path!r}, "
                              f"public={self.public!r}")
        for key, value in (("data-path", self.data_path), ("test-path", self.test_path),
                           ("public-path", self.public_path)):
            if value is not None and not Path(value).expanduser().is_file():
                raise ConfigError(f"node config {key}='{value}': file not found on this node")


def _string(config: dict, key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"node config {key} must be a non-empty string, got {value!r}")
    return value


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"node config test-fraction must be a number in (0, 1), got {value!r}")
    return float(value)


def node_settings(settings: ClientSettings, context: Context) -> ClientSettings:
    """The run's settings as this node sees them: its own arch and role, if its config names them.

    The arch must be one of the run's architectures (`settings.archs`); the server learns it
    from the node's replies (`fedkd.client.report`).
    """
    node = NodeConfig.from_context(context)
    pid = node.partition_id
    if not 0 <= pid < len(settings.assignment):
        last = len(settings.assignment) - 1
        raise ConfigError(f"node config partition-id={pid} is outside 0..{last} (the run has "
                          f"num_clients={last + 1})")
    if node.arch is None and node.role is None:
        return settings
    assignment, roles = list(settings.assignment), list(settings.roles or ["student"] * len(
        settings.assignment))
    if node.arch is not None:
        if node.arch not in settings.archs:
            raise ConfigError(f"node config arch={node.arch!r} is not one of the run's "
                              f"architectures {sorted(settings.archs)}")
        assignment[pid] = node.arch
    if node.role is not None:
        roles[pid] = node.role
    return dataclasses.replace(settings, assignment=assignment, roles=roles)
