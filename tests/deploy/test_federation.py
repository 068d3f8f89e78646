"""Real processes on 127.0.0.1: a SuperLink, SuperNodes with their own data files, ``flwr run``.

Every process a test starts is stopped by `LocalFederation` (process groups, SIGTERM then
SIGKILL) and each test checks that nothing it started outlives it. Ports are picked free, Flower's
home is a temporary folder per test.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from fedkd.deploy.federation import CONNECTION, LocalFederation, Options, RunResult
from fedkd.deploy.latency import round_latency
from fedkd.deploy.security import make_node_key

FAST = ("distill.warmup_epochs=5",)


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


def _outlived(workdir: Path, timeout: float) -> list[str]:
    """`_leftovers` once they are gone or `timeout` passed: the ServerApp SuperExec a SuperLink
    starts in a session of its own exits by itself once it sees its parent gone (after its
    imports, which take seconds on a loaded machine)."""
    end = time.monotonic() + timeout
    while (found := _leftovers(workdir)) and time.monotonic() < end:
        time.sleep(0.2)
    return found


@pytest.fixture
def workdir(tmp_path: Path):
    """A work folder; after the test, no process started there may still run."""
    yield tmp_path
    assert _outlived(tmp_path, timeout=120) == []


def _accuracy(result: RunResult) -> pd.DataFrame:
    frame = pd.read_parquet(result.out_dir / "metrics.parquet")
    return frame[frame.metric == "test-accuracy"].pivot_table(index="round", columns="client",
                                                               values="value")


@pytest.mark.slow  # ~30 s; the default suite keeps one Ray simulation (tests/test_simulation.py)
def test_two_nodes_two_rounds_of_fedmd(workdir):
    """TLS and node authentication on (as deployed); an unregistered node: the slow test below."""
    opts = Options(num_nodes=2, rounds=2, archs=("cnn_small", "cnn_teacher"), overrides=FAST,
                   round_timeout=300, secure=True)  # a wait, ended by the last reply
    with LocalFederation(workdir, opts) as fed:
        result = fed.run(timeout=600)  # ends with the run; generous for a loaded machine
        assert _leftovers(workdir)  # sanity: the check sees the running federation
        superlink_log = fed.superlink.log_text()

    assert "Uvicorn running on https://" in superlink_log  # TLS

    summary = result.summary
    assert result.returncode == 0 and summary["status"] == "ok"
    assert {"metrics.parquet", "summary.json", "accuracy.png", "config.yaml"} <= {
        p.name for p in result.out_dir.iterdir()}
    assert summary["archs"] == ["cnn_small", "cnn_teacher"]  # chosen by the nodes' configs
    assert summary["dataset"] == "nodes" and summary["partition_hash"] == "on-nodes"
    assert summary["partition"] == "on-nodes" and summary["partition_seed"] is None
    acc = _accuracy(result)
    assert list(acc.index) == [1, 2] and list(acc.columns) == [0, 1]
    assert acc.loc[2].min() > 0.5  # 10 classes: chance is 0.1
    latency = round_latency(result.out_dir / "metrics.parquet")
    assert list(latency["round"]) == [1, 2] and (latency.slowest_compute_s > 0).all()
    log = result.log_path.read_text()
    assert "wire: HttpGrid wrapped in WireGrid" in log  # our poll loop, not Flower's 3 s sleeps


@pytest.mark.slow  # a secure federation of its own
def test_an_unregistered_node_is_refused(workdir):
    with LocalFederation(workdir, Options(num_nodes=1, secure=True)) as fed:
        key, _ = make_node_key(workdir / "keys", "intruder")
        intruder = fed.start_node(0, key=key, name="intruder")
        assert intruder.popen is not None
        code = intruder.wait_for_exit(timeout=300)  # refused: it gives up and exits
        assert code is not None, f"the intruder still runs:\n{intruder.tail(40)}"
        refused = fed.superlink.wait_for_log("No SuperNode found with the given public key", 60)
        listed = subprocess.run(["flwr", "supernode", "list", CONNECTION, "--format", "json"],
                                capture_output=True, text=True, env=fed.env(), check=True)
        registered_alive = fed.nodes[0].alive
        superlink_log = fed.superlink.log_text()
        intruder_log = intruder.log_text()  # whole log: its workers' shutdown tracebacks follow

    assert code == 1, f"exit status {code}"  # Flower logs "Exit Code: 305" but exits with 1
    assert "Failed to activate SuperNode" in intruder_log, intruder_log
    assert "Exit Code: 305" in intruder_log, intruder_log
    assert refused, superlink_log
    assert "Uvicorn running on https://" in superlink_log  # TLS
    nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
    assert len(nodes) == 1 and registered_alive  # only the registered node is in


@pytest.mark.slow
def test_secure_three_nodes_equal_the_simulation(workdir):
    """TLS + authentication, heterogeneous students: the numbers of the simulation, bit for bit."""
    from fedkd.server import compose_config
    from fedkd.simulations.run import run

    opts = Options(num_nodes=3, rounds=3, secure=True, overrides=FAST)
    with LocalFederation(workdir, opts) as fed:
        result = fed.run(timeout=400)
    sim = run(compose_config(["num_clients=3", "num_rounds=3", *FAST, "model=hetero",
                              "+model.clients.2=cnn_teacher",
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

    assert result.returncode == 0 and result.summary["status"] == "degraded"  # says who failed
    assert result.summary["status_reasons"][0].startswith("client 2 failed in ")
    acc = _accuracy(result)
    assert list(acc.index) == [1, 2, 3] and acc.loc[3, [0, 1]].notna().all()
    assert pd.isna(acc.loc[3, 2])  # the dead node never answered again
    assert "did not answer within 15 s" in result.log_path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("secure", [pytest.param(False, id="insecure"),
                                    pytest.param(True, id="tls-auth")])
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

    assert result.returncode == 0 and result.summary["status"] == "degraded"  # a round lost
    assert result.summary["status_reasons"][0].startswith("client 1 failed in ")
    assert "partition 1: student (mlp) resumed from checkpoint" in restart_log
    frame = pd.read_parquet(result.out_dir / "metrics.parquet")
    loss = frame[(frame.metric == "train-loss") & (frame.client == 1)].set_index("round").value
    acc = _accuracy(result)[1].dropna()
    back = min(r for r in acc.index if r > 2)  # its first round after the restart
    assert loss[back] < 0.5 * loss[1]  # not a warm-up from scratch again
    assert acc[back] >= acc[1]


class _FakeFederation:
    """Stands in for `LocalFederation` in the CLI tests: writes a result, starts nothing."""

    returncode = 0

    def __init__(self, workdir: Path, options: Options) -> None:
        self.workdir = workdir

    def __enter__(self) -> _FakeFederation:
        (self.workdir / "results" / "run-1").mkdir(parents=True)
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start_run(self) -> None:
        return None

    def finish_run(self, proc: None, timeout: float) -> RunResult:
        out = self.workdir / "results" / "run-1"
        return RunResult(self.returncode, out if self.returncode == 0 else None,
                         self.workdir / "run.log", 1.0)


@pytest.mark.parametrize(("argv", "returncode", "kept"), [
    pytest.param([], 0, True, id="default-keeps"),
    pytest.param(["--clean"], 0, False, id="clean-removes"),
    pytest.param(["--clean"], 1, True, id="clean-keeps-a-failed-run")])
def test_federation_run_keeps_its_folder_unless_clean(tmp_path, monkeypatch, caplog, argv,
                                                      returncode, kept):
    from fedkd.deploy import cli

    workdir = tmp_path / "fedkd-federation-x"
    workdir.mkdir()
    monkeypatch.setattr(cli.tempfile, "mkdtemp", lambda prefix: str(workdir))
    monkeypatch.setattr(cli, "LocalFederation", _FakeFederation)
    monkeypatch.setattr(_FakeFederation, "returncode", returncode)
    monkeypatch.setattr(cli, "_report", lambda result: None)

    with caplog.at_level("INFO", logger="fedkd.deploy"):
        code = cli.main(["run", *argv])

    assert code == (0 if returncode == 0 else 1)
    assert workdir.is_dir() == kept
    said = "work folder kept: " if kept else "removed (--clean)"
    assert said in caplog.text and str(workdir) in caplog.text


def test_federation_run_refuses_clean_with_a_workdir(tmp_path, capsys):
    from fedkd.deploy.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--clean", "--workdir", str(tmp_path)])

    assert "--clean=true: removes only the temporary work folder" in capsys.readouterr().err
    assert tmp_path.is_dir()


def test_a_deployment_summary_names_no_partition_of_its_own(deployment, tmp_path):
    """With dataset=nodes the server made no partition: no Dirichlet, no partition seed."""
    from fedkd.simulations.results import Recorder

    deployed = Recorder.for_run(deployment.server, tmp_path / "deployed").info
    simulated = Recorder.for_run(deployment.sim, tmp_path / "sim").info

    assert deployed["dataset"] == "nodes"
    assert (deployed["partition"], deployed["partition_seed"], deployed["partition_hash"]) == (
        "on-nodes", None, "on-nodes")
    assert (simulated["partition"], simulated["partition_seed"]) == ("dirichlet", 42)
    assert simulated["partition_hash"] not in ("", "on-nodes")
