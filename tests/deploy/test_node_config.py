"""Node config: every key checked, errors name the bad value and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedkd.client.node import NODE_KEYS, NodeConfig, node_settings
from fedkd.errors import ConfigError
from tests.deploy.conftest import node_context


def _ctx(**config) -> Context:
    return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})


def test_simulation_node_config_is_not_deployed():
    node = NodeConfig.from_context(_ctx(**{"partition-id": 3, "num-partitions": 10}))

    assert node.partition_id == 3 and not node.deployed and node.checkpoints is None


def test_deployed_node_config(deployment, tmp_path):
    ctx = node_context(deployment.files, 1, arch="mlp", role="teacher",
                       **{"checkpoint-dir": str(tmp_path)})

    node = NodeConfig.from_context(ctx)

    assert node.deployed and node.arch == "mlp" and node.role == "teacher"
    assert node.checkpoints == tmp_path


@pytest.mark.parametrize(("config", "message"), [
    ({"partition-id": 0, "data_path": "x"},
     r"^node-config.data_path='x': is not an option; options: \['arch', 'checkpoint-dir', 'data-path'"),
    ({"num-partitions": 2}, r"^node-config.partition-id=null: must be an int >= 0"),
    ({"partition-id": -1}, r"^node-config.partition-id=-1: must be an int >= 0"),
    ({"partition-id": "0"}, r"^node-config.partition-id='0': must be an int >= 0"),
    ({"partition-id": 0, "role": "boss"},
     r"^node-config.role='boss': must be one of \['student', 'teacher'\]"),
    ({"partition-id": 0, "public": "digits"},
     r"^node-config.public='digits': is for a deployed node, which needs data-path"),
    ({"partition-id": 0, "test-fraction": 1.5},
     r"^node-config.test-fraction=1.5: must be a number in \(0, 1\)"),
    ({"partition-id": 0, "arch": ""}, r"^node-config.arch='': must be a non-empty string"),
])
def test_bad_node_config_is_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_context(_ctx(**config))


def test_deployed_node_needs_one_public_source_and_existing_files(deployment, tmp_path):
    both = node_context(deployment.files, 0, public="digits")
    with pytest.raises(ConfigError, match=r"^node-config.public-path=.*: a deployed node needs exactly one of public-path"):
        NodeConfig.from_context(both)
    missing = node_context(deployment.files, 0, **{"data-path": str(tmp_path / "nope.npz")})
    with pytest.raises(ConfigError, match=r"^node-config.data-path='.*nope.npz': must be a file on this node \(not found\)"):
        NodeConfig.from_context(missing)


def test_every_key_is_documented():
    assert all(len(text) > 10 for text in NODE_KEYS.values())


def test_the_deploy_guide_lists_every_key():
    """docs/deploy.md's node-config table has one row per key of `NODE_KEYS`."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    rows = {m for line in guide.splitlines() if line.startswith("| `")
            for m in re.findall(r"`([a-z-]+)`", line.split("|")[1])}

    assert set(NODE_KEYS) <= rows, sorted(set(NODE_KEYS) - rows)


def test_node_picks_its_own_arch_and_role(deployment):
    settings = deployment.server.settings
    ctx = node_context(deployment.files, 0, arch="cnn_teacher", role="teacher")

    mine = node_settings(settings, ctx)

    assert mine.arch_of(0)[0] == "cnn_teacher" and mine.role_of(0) == "teacher"
    assert mine.assignment[1:] == settings.assignment[1:]
    assert node_settings(settings, node_context(deployment.files, 0)) is settings


def test_unknown_arch_or_partition_is_refused(deployment):
    settings = deployment.server.settings
    with pytest.raises(ConfigError, match=r"^node-config.arch='resnet': must be one of the run's architectures \["):
        node_settings(settings, node_context(deployment.files, 0, arch="resnet"))
    ctx = node_context(deployment.files, 0)
    ctx.node_config = {**ctx.node_config, "partition-id": 7}
    with pytest.raises(ConfigError, match=r"^node-config.partition-id=7: must be in 0\.\.2"):
        node_settings(settings, ctx)


def test_deployment_server_offers_every_catalogued_arch(deployment):
    assert set(deployment.server.settings.archs) == {"cnn_small", "mlp", "cnn_teacher"}
    assert set(deployment.sim.settings.archs) == {"cnn_small", "mlp"}


# --- fedkd-supernode checks the node config when it starts ---------------------------------------
@pytest.mark.parametrize(("node_config", "line"), [
    ('partition-id=0 data_path="/data/train.npz"', "node-config.data_path='/data/train.npz': is "
                                                   "not an option; options: ['arch', "),
    ("partition-id=-1", "node-config.partition-id=-1: must be an int >= 0"),
    ('partition-id=0 data-path="/nope.npz" public="digits"',
     "node-config.data-path='/nope.npz': must be a file on this node (not found)"),
    ("partition-id==", "node-config='partition-id==': is not in Flower's format"),
])
def test_supernode_refuses_a_bad_node_config_before_it_starts(node_config, line, monkeypatch,
                                                              capsys):
    from fedkd.deploy import supernode

    def started(*args, **kwargs):
        raise AssertionError("the SuperNode (or its worker) was started")

    monkeypatch.setattr(supernode, "run_flower_supernode", started)
    monkeypatch.setattr(supernode, "start_worker_superexec", started)

    with pytest.raises(SystemExit) as stopped:
        supernode.main(["--insecure", "--superlink", "127.0.0.1:9092", "--node-config", node_config])

    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"configuration error: {line}"), err


def test_supernode_reads_the_node_config_as_flower_does(deployment):
    from fedkd.deploy.supernode import check_node_config

    text = deployment.files.node_config(1, arch="mlp")

    node = check_node_config(["--superlink", "x:1", "--node-config", text])

    assert node == NodeConfig.from_context(node_context(deployment.files, 1, arch="mlp"))
    assert check_node_config(["--insecure"]) is None  # no node config: Flower's default


def test_a_node_with_a_typo_exits_at_start_in_one_line(tmp_path):
    """The process: `fedkd-supernode` with ``data_path`` exits 2, before it connects anywhere."""
    import os
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo),
                                                                    os.environ.get("PYTHONPATH")])),
           "FLWR_HOME": str(tmp_path)}
    t0 = time.monotonic()
    proc = subprocess.run(  # port 9 (discard): nothing would ever answer
        [sys.executable, "-m", "fedkd.deploy.supernode", "--insecure", "--superlink",
         "127.0.0.1:9", "--node-config", 'partition-id=0 data_path="/data/train.npz"'],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    seconds = time.monotonic() - t0

    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "configuration error: node-config.data_path='/data/train.npz': is not an option; "
        "options: ['arch', 'checkpoint-dir', 'data-path', 'label-column', 'num-partitions', "
        "'partition-id', 'public', 'public-path', 'role', 'test-fraction', 'test-path']"]
    print(f"fedkd-supernode with a bad node config stopped after {seconds:.1f} s")  # noqa: T201
