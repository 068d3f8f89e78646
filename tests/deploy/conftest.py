"""Deployment fixtures: node files exported from digits, and the server's deployment run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedkd.deploy.files import FederationFiles, export_node_files
from fedkd.server import PreparedRun, compose_config, prepare_run

NODES = 3
BASE = [f"num_clients={NODES}", "num_rounds=2", "distill.warmup_epochs=5", "model=hetero"]


@dataclass
class Deployment:
    """The same split as a simulation (`sim`), as node files and a deployment server run."""

    files: FederationFiles
    sim: PreparedRun
    server: PreparedRun
    cache: Path


def node_context(files: FederationFiles, pid: int, run_id: int = 1, **extra) -> Context:
    """A deployed node's Context: its own files (and `extra` node-config keys)."""
    config = {"partition-id": pid, "data-path": str(files.train[pid]),
              "test-path": str(files.test), "public-path": str(files.public), **extra}
    return Context(run_id=run_id, node_id=500 + pid, node_config=config, state=RecordDict(),
                   run_config={})


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """Digits for 3 nodes: simulation cache, exported node files, deployment server settings."""
    root = tmp_path_factory.mktemp("deploy")
    cache = root / "cache"
    sim = prepare_run(compose_config([*BASE, f"simulation.cache_dir={cache}"]))
    files = export_node_files(compose_config(BASE), root / "files")
    server = prepare_run(compose_config([
        *BASE, f"simulation.cache_dir={cache}", "dataset=nodes", f"dataset.public={files.public}"]))
    return Deployment(files=files, sim=sim, server=server, cache=cache)
