"""Every dataset/partition yaml composes, resolves and (for offline sets) prepares."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedkd.data import prepare_data

CONF = Path(__file__).resolve().parents[2] / "conf"
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml")  # with a source: not `nodes`
                  if "on_nodes" not in OmegaConf.load(p))  # (deployment, tests/deploy)
PARTITIONS = sorted(p.stem for p in (CONF / "partition").glob("*.yaml"))
OFFLINE_DATASETS = ["digits"]  # files needs a path, hub needs internet, mnist1d is slower


def _compose(dataset: str, partition: str, overrides: dict | None = None) -> dict:
    root = OmegaConf.create({"num_clients": 5, "partition_seed": 3, "seed": 0})
    root.dataset = OmegaConf.load(CONF / "dataset" / f"{dataset}.yaml")
    root.partition = OmegaConf.load(CONF / "partition" / f"{partition}.yaml")
    root.merge_with(overrides or {})
    return OmegaConf.to_container(root, resolve=True)


def test_groups_are_present() -> None:
    assert {"digits", "mnist1d", "files", "hub"} <= set(DATASETS)
    assert {"iid", "dirichlet", "pathological"} <= set(PARTITIONS)


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_yaml_resolves(dataset: str) -> None:
    extra = {"dataset": {"path": "/data/train.npz"}} if dataset == "files" else {}

    cfg = _compose(dataset, "iid", extra)["dataset"]

    assert cfg["name"] == dataset and "_target_" in cfg["source"]
    assert {"test_fraction", "public_size", "normalize"} <= set(cfg)


def test_files_yaml_interpolates_path() -> None:
    source = _compose("files", "iid", {"dataset": {"path": "/d/a.csv"}})["dataset"]["source"]

    assert source["path"] == "/d/a.csv" and source["test_path"] is None


@pytest.mark.parametrize("partition", PARTITIONS)
def test_partition_yaml_takes_partition_seed(partition: str) -> None:
    cfg = _compose("digits", partition)["partition"]

    assert cfg["name"] == partition and "name" not in cfg["partitioner"]
    assert cfg["partitioner"].get("seed", 3) == 3


@pytest.mark.parametrize("dataset", OFFLINE_DATASETS)
@pytest.mark.parametrize("partition", PARTITIONS)
def test_prepare_with_each_yaml(
    tmp_path: Path, dataset: str, partition: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _compose(dataset, partition)
    caplog.set_level(logging.INFO, logger="fedkd.data")

    info = prepare_data(cfg["dataset"], cfg["partition"]["partitioner"], cfg["num_clients"],
                        cfg["partition_seed"], tmp_path)

    assert len(info.client_sizes) == 5 and min(info.client_sizes) > 0
    assert info.partition_hash in caplog.text and "client 4:" in caplog.text
