"""Real processes on 127.0.0.1: a SuperLink, SuperNodes with their own data files, ``flwr run``.

Every process a test starts is stopped by `LocalFederation` (process groups, SIGTERM then
SIGKILL) and each test checks that nothing it started outlives it. Ports are picked free, Flower's
home is a temporary folder per test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import psutil
import pytest

from fedkd.deploy.federation import CONNECTION, LocalFederation, Options, RunResult
from fedkd.deploy.latency import round_latency
from fedkd.deploy.security import make_node_key

FAST = ("distill.warmup_epochs=5",)
needs_tools = pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")),
    reason="TLS and node keys need openssl and ssh-keygen")


def _leftovers(workdir: Path) -> list[str]:
    """Processes whose Flower home lies in `workdir` (every federation process has one)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            home = proc.environ().get("FLWR_HOME", "")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if home.startswith(str(workdir)) and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])}")
    return found


@pytest.fixture
def workdir(tmp_path: Path):
    """A work folder; after the test, no process started there may still run."""
    yield tmp_path
    assert _leftovers(tmp_path) == []


def _accuracy(result: RunResult) -> pd.DataFrame:
    frame = pd.read_parquet(result.out_dir / "metrics.parquet")
    return frame[frame.metric == "test-accuracy"].pivot_table(index="round", columns="client",
                                                               values="value")


def test_two_nodes_two_rounds_of_fedmd(workdir):
    opts = Options(num_nodes=2, rounds=2, archs=("cnn_small", "cnn_teacher"), overrides=FAST,
                   round_timeout=120)
    with LocalFederation(workdir, opts) as fed:
        result = fed.run(timeout=300)
        assert _leftovers(workdir)  # sanity: the check sees the running federation

    summary = result.summary
    assert result.returncode == 0 and summary["status"] == "ok"
    assert {"metrics.parquet", "summary.json", "accuracy.png", "config.yaml"} <= {
        p.name for p in result.out_dir.iterdir()}
    assert summary["archs"] == ["cnn_small", "cnn_teacher"]  # chosen by the nodes' configs
    assert summary["dataset"] == "nodes" and summary["partition_hash"] == "on-nodes"
    acc = _accuracy(result)
    assert list(acc.index) == [1, 2] and list(acc.columns) == [0, 1]
    assert acc.loc[2].min() > 0.5  # 10 classes: chance is 0.1
    latency = round_latency(result.out_dir / "metrics.parquet")
    assert list(latency["round"]) == [1, 2] and (latency.slowest_compute_s > 0).all()
    log = result.log_path.read_text()
    assert "wire: HttpGrid wrapped in WireGrid" in log  # our poll loop, not Flower's 3 s sleeps


@needs_tools
def test_an_unregistered_node_is_refused(workdir):
    with LocalFederation(workdir, Options(num_nodes=1, secure=True)) as fed:
        key, _ = make_node_key(workdir / "keys", "intruder")
        intruder = fed.start_node(0, key=key, name="intruder")
        assert intruder.popen is not None
        code = intruder.popen.wait(timeout=90)
        listed = subprocess.run(["flwr", "supernode", "list", CONNECTION, "--format", "json"],
                                capture_output=True, text=True, env=fed.env(), check=True)
        registered_alive = fed.nodes[0].alive
        superlink_log = fed.superlink.log_path.read_text()

    assert code != 0 and "Failed to activate SuperNode" in intruder.tail(40)
    assert "No SuperNode found with the given public key" in superlink_log
    assert "Uvicorn running on https://" in superlink_log  # TLS
    nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
    assert len(nodes) == 1 and registered_alive  # only the registered node is in


@pytest.mark.slow
@needs_tools
def test_secure_three_nodes_equal_the_simulation(workdir):
    """TLS + authentication, heterogeneous students: the numbers of the simulation, bit for bit."""
    from fedkd.server import compose_config
    from fedkd.simulations.run import run

    opts = Options(num_nodes=3, rounds=3, secure=True, overrides=FAST)
    with LocalFederation(workdir, opts) as fed:
        result = fed.run(timeout=400)
    sim = run(compose_config(["num_clients=3", "num_rounds=3", *FAST, "+model.clients.2=cnn_teacher",
                              f"simulation.cache_dir={workdir / 'sim-cache'}"]), workdir / "sim")

    assert result.summary["archs"] == sim["archs"] == ["cnn_small", "mlp", "cnn_teacher"]
    assert result.summary["public_fingerprint"] == sim["public_fingerprint"]
    assert result.summary["final_accuracy_by_client"] == sim["final_accuracy_by_client"]
    sim_acc = pd.read_parquet(workdir / "sim" / "metrics.parquet")
    sim_acc = sim_acc[sim_acc.metric == "test-accuracy"].pivot_table(
        index="round", columns="client", values="value")
    pd.testing.assert_frame_equal(_accuracy(result), sim_acc)


@pytest.mark.slow
def test_a_killed_node_does_not_stop_the_run(workdir):
    opts = Options(num_nodes=3, rounds=3, overrides=FAST, round_timeout=15)
    with LocalFederation(workdir, opts) as fed:
        run = fed.start_run()
        assert fed.wait_for_round(run, 1, timeout=240)
        fed.kill_node(2)
        result = fed.finish_run(run, timeout=300)

    assert result.returncode == 0 and result.summary["status"] == "ok"
    acc = _accuracy(result)
    assert list(acc.index) == [1, 2, 3] and acc.loc[3, [0, 1]].notna().all()
    assert pd.isna(acc.loc[3, 2])  # the dead node never answered again
    assert "did not answer within 15 s" in result.log_path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("secure", [pytest.param(False, id="insecure"),
                                    pytest.param(True, id="tls-auth", marks=needs_tools)])
def test_a_restarted_node_resumes_its_student_from_the_checkpoint(workdir, secure):
    """Killed mid-round, started again: it rejoins (under auth with the same node id, once the
    SuperLink has counted it offline) and its student goes on from the checkpoint."""
    opts = Options(num_nodes=3, rounds=30 if secure else 4, secure=secure, overrides=FAST,
                   round_timeout=15)
    with LocalFederation(workdir, opts) as fed:
        run = fed.start_run()
        assert fed.wait_for_round(run, 2, timeout=240)
        fed.kill_node(1)
        restarted = fed.restart_node(1)
        result = fed.finish_run(run, timeout=400)
        restart_log = restarted.log_path.read_text()

    assert result.returncode == 0 and result.summary["status"] == "ok"
    assert "partition 1: student (mlp) resumed from checkpoint" in restart_log
    frame = pd.read_parquet(result.out_dir / "metrics.parquet")
    loss = frame[(frame.metric == "train-loss") & (frame.client == 1)].set_index("round").value
    acc = _accuracy(result)[1].dropna()
    back = min(r for r in acc.index if r > 2)  # its first round after the restart
    assert loss[back] < 0.5 * loss[1]  # not a warm-up from scratch again
    assert acc[back] >= acc[1]
