"""Write one data file per device from a data set, as a simulation would partition it.

For trying a deployment on one machine (and for tests): the same split and partition as
``fedkd-sim`` with the same ``dataset``, ``partition``, ``num_clients`` and ``partition_seed``
(the partition hash is the same), written *raw* (not normalised: a device holds its raw data and
normalises it with the public set's statistics). Per node ``node-<i>/train.npz`` (``x``, ``y`` with
the federation's class ids); shared ``public.npz`` (``x`` only) and ``test.npz``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedkd.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationFiles:
    """Where the exported files are."""

    root: Path
    public: Path
    test: Path
    train: tuple[Path, ...]
    partition_hash: str
    num_classes: int

    def node_config(self, partition_id: int, **extra: str | int | float) -> str:
        """A ``--node-config`` string for one node (paths quoted; `extra` keys appended)."""
        values = {"partition-id": partition_id, "data-path": str(self.train[partition_id]),
                  "test-path": str(self.test), "public-path": str(self.public), **extra}
        return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"
                        for k, v in values.items())


def export_node_files(cfg: DictConfig, out_dir: str | Path) -> FederationFiles:
    """Split and partition ``cfg.dataset`` like a simulation and write one file per node."""
    from fedkd.data import make_partitioner, partition_hash, partition_indices, split_data
    from fedkd.data._config import instantiate, require_target
    from fedkd.data.raw import RawData

    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    if dataset.get("on_nodes"):
        raise ConfigError("export_node_files needs a data set with a source (e.g. dataset=digits), "
                          "not dataset=nodes")
    num_clients, seed = int(cfg.num_clients), int(cfg.partition_seed)
    raw = instantiate(require_target(dataset.get("source"), "dataset.source"), "dataset.source")
    if not isinstance(raw, RawData):
        raise ConfigError(f"dataset.source must return RawData, got {type(raw).__name__}")
    split = split_data(raw, dataset.get("test_fraction"), dataset.get("public_size"), seed)
    partition = OmegaConf.to_container(cfg.partition.partitioner, resolve=True)
    partitioner = make_partitioner(partition, num_clients, len(split.private_y), seed=seed,
                                   num_classes=raw.num_classes)
    parts = partition_indices(split.private_y, partitioner, num_clients)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "public.npz", x=split.public_x)
    np.savez(root / "test.npz", x=split.test_x, y=split.test_y)
    train = []
    for i, part in enumerate(parts):
        (root / f"node-{i}").mkdir(exist_ok=True)
        train.append(root / f"node-{i}" / "train.npz")
        np.savez(train[-1], x=split.private_x[part], y=split.private_y[part])
    files = FederationFiles(
        root=root, public=root / "public.npz", test=root / "test.npz", train=tuple(train),
        partition_hash=partition_hash([split.private_ids[p] for p in parts]),
        num_classes=raw.num_classes,
    )
    log.info("Wrote %d node files (%s rows), public (%d rows) and test (%d rows) to %s; "
             "partition hash %s", num_clients, [len(p) for p in parts], len(split.public_x),
             len(split.test_y), root, files.partition_hash)
    return files
