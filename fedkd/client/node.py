"""What a SuperNode says about itself: its node config, read and checked.

In simulation Flower sets only ``partition-id`` and ``num-partitions``; the data comes from the
server-prepared cache. A deployed SuperNode is started with its own keys::

    flower-supernode ... --node-config 'partition-id=0 data-path="/data/train.npz"
        test-path="/data/test.npz" public-path="/data/public.npz" arch="mlp" role="student"'

``data-path`` switches the node to its own files. Every key is listed in `NODE_KEYS`; any other
key is refused with the list, so a typo (``data_path``) fails loudly instead of being ignored.
``fedkd-supernode`` checks the node config when it starts (`NodeConfig.from_mapping`), before it
connects; the ClientApp checks it again at every message (plain ``flower-supernode`` has only
that). Refusals read ``node-config.<key>=<value>: <what is allowed>``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fedkd.settings import ClientSettings
from fedkd.errors import ConfigError, is_int, require_choice, require_keys, require_number

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
WHERE = "node-config"
"""How refusals name a node config key (``node-config.data-path``)."""


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
        return cls.from_mapping(dict(context.node_config))

    @classmethod
    def from_mapping(cls, config: dict[str, object]) -> NodeConfig:
        """Check a node config (as Flower parses ``--node-config``) and read it."""
        require_keys(WHERE, config, NODE_KEYS)
        pid = config.get("partition-id")
        if not is_int(pid) or pid < 0:
            raise ConfigError(f"{WHERE}.partition-id", pid,
                              "must be an int >= 0 (this node's id, 0..num_clients-1)")
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
        if self.role is not None:
            require_choice(f"{WHERE}.role", self.role, ROLES)
        if not self.deployed:
            files = (("test-path", self.test_path), ("public-path", self.public_path),
                     ("public", self.public))
            stray = [key for key, value in files if value is not None]
            if stray:
                raise ConfigError(f"{WHERE}.{stray[0]}", dict(files)[stray[0]],
                                  "is for a deployed node, which needs data-path (its private "
                                  "data file) too")
            return
        if (self.public_path is None) == (self.public is None):
            raise ConfigError(f"{WHERE}.public-path", self.public_path,
                              "a deployed node needs exactly one of public-path (a file) or "
                              f"public (an embedded name); public={self.public!r}")
        for key, value in (("data-path", self.data_path), ("test-path", self.test_path),
                           ("public-path", self.public_path)):
            if value is not None and not Path(value).expanduser().is_file():
                raise ConfigError(f"{WHERE}.{key}", value, "must be a file on this node "
                                                           "(not found)")


def _string(config: dict, key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{WHERE}.{key}", value, "must be a non-empty string")
    return value


def _fraction(value: object) -> float:
    return require_number(f"{WHERE}.test-fraction", value, 0.0, 1.0, low_open=True,
                          high_open=True)


def node_settings(settings: ClientSettings, context: Context) -> ClientSettings:
    """The run's settings as this node sees them: its own arch and role, if its config names them.

    The arch must be one of the run's architectures (`settings.archs`); the server learns it
    from the node's replies (`fedkd.client.report`).
    """
    node = NodeConfig.from_context(context)
    pid = node.partition_id
    if not 0 <= pid < len(settings.assignment):
        last = len(settings.assignment) - 1
        raise ConfigError(f"{WHERE}.partition-id", pid,
                          f"must be in 0..{last} (the run has num_clients={last + 1})")
    if node.arch is None and node.role is None:
        return settings
    assignment, roles = list(settings.assignment), list(settings.roles or ["student"] * len(
        settings.assignment))
    if node.arch is not None:
        if node.arch not in settings.archs:
            raise ConfigError(f"{WHERE}.arch", node.arch,
                              f"must be one of the run's architectures {sorted(settings.archs)}")
        assignment[pid] = node.arch
    if node.role is not None:
        roles[pid] = node.role
    return dataclasses.replace(settings, assignment=assignment, roles=roles)
