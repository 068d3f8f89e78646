"""The simulation on an existing Ray cluster (`simulation.ray_init.address`, docs/scale.md).

Fast: the address is checked before data or Ray (one line naming the key), the clients'
resources against the cluster's nodes as Flower counts them, and a node's copy of the prepared
data (`fedkd.data.ship.ensure_cache`). Slow: a head and a worker node started here with
``ray start`` (the worker keeps its data in a folder of its own) run the same simulation as one
local Ray, with the same accuracies; only the processes started here are stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

import fedkd.server
import fedkd.simulations.launch as launch
from fedkd.data import ship
from fedkd.errors import ConfigError, error_line, find_config_error
from fedkd.server import compose_config
from fedkd.simulations import ray_cluster
from fedkd.simulations.run import run

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["num_clients=4", "num_rounds=2", "distill.warmup_epochs=1", "simulation.checkpoint_every=0",
        "simulation.client_resources.num_cpus=1"]
"""Digits, 4 clients, 2 rounds: one client per CPU, two CPUs in both runs."""


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail on preparing data or starting Ray / Flower's simulation; the names of those reached."""
    reached: list[str] = []

    def reach(name: str):
        def refuse(*args, **kwargs):
            reached.append(name)
            raise AssertionError(f"{name} was reached: the value was not checked before it")
        return refuse

    monkeypatch.setattr(fedkd.server, "prepare_data", reach("prepare_data"))
    monkeypatch.setattr(launch, "init_ray", reach("ray.init"))
    import flwr.simulation
    monkeypatch.setattr(flwr.simulation, "run_simulation", reach("run_simulation"))
    return reached


def _stops_with(overrides: list[str], tmp_path: Path) -> str:
    cfg = compose_config([f"simulation.cache_dir={tmp_path / 'cache'}", *overrides])
    with pytest.raises(Exception) as caught:
        run(cfg, tmp_path / "out")
    err = find_config_error(caught.value)
    assert isinstance(err, ConfigError), repr(caught.value)
    assert error_line(err) == f"configuration error: {err}" and "\n" not in error_line(err)
    return str(err)


# --- before anything starts -----------------------------------------------------------------------
def test_auto_without_a_cluster_stops_before_data_and_ray(tmp_path, monkeypatch, nothing_starts):
    import ray._private.utils

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: None)

    message = _stops_with(["simulation.ray_init.address=auto"], tmp_path)

    assert message.startswith("simulation.ray_init.address='auto': found no Ray cluster"), message
    assert not nothing_starts


def test_an_address_where_nothing_listens_stops_before_data_and_ray(tmp_path, nothing_starts):
    port = free_ports(1)[0]

    message = _stops_with([f"simulation.ray_init.address=127.0.0.1:{port}"], tmp_path)

    assert message.startswith(f"simulation.ray_init.address='127.0.0.1:{port}': no Ray cluster "
                              f"answers at 127.0.0.1:{port}"), message
    assert not nothing_starts


@pytest.mark.parametrize("overrides, key", [
    (["simulation.ray_init.num_cpus=2"], "simulation.ray_init.num_cpus=2"),
    (["+simulation.ray_init.num_gpus=1"], "simulation.ray_init.num_gpus=1"),
    (["simulation.client_resources.num_cpus=0"], "simulation.client_resources.num_cpus=0"),
    (["simulation.ray_init.address=nohost"], "simulation.ray_init.address='nohost'"),
])
def test_what_a_cluster_run_refuses_before_connecting(overrides, key, tmp_path, nothing_starts):
    message = _stops_with(["simulation.ray_init.address=127.0.0.1:1", *overrides], tmp_path)

    assert message.startswith(f"{key}: "), message


def test_auto_follows_ray_address_and_the_last_ray_start(monkeypatch):
    import ray._private.utils

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_cluster.resolve_address("auto") == "10.0.0.1:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: "10.0.0.2:1")
    assert ray_cluster.resolve_address("auto") == "10.0.0.2:1"
    assert ray_cluster.resolve_address("ray://h:10001") == "ray://h:10001"


# --- once connected: the resources against the cluster's nodes -----------------------------------
NODES = [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
         {"Alive": True, "Resources": {"CPU": 2.0}},
         {"Alive": False, "Resources": {}}]  # a node that left


@pytest.mark.parametrize("resources", [
    {"num_cpus": 1, "num_gpus": 0.0}, {"num_cpus": 2, "num_gpus": 0.0}, {"num_cpus": 0.5},
    {"num_cpus": 1, "num_gpus": 0.5}, {"num_cpus": 3, "num_gpus": 0.0},
])
def test_clients_at_once_are_counted_as_flower_counts_them(monkeypatch, resources):
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    monkeypatch.setattr(ray, "nodes", lambda: NODES)

    assert ray_cluster.check_cluster(resources, "h:1") == pool_size_from_resources(resources)


@pytest.mark.parametrize("resources, message", [
    ({"num_cpus": 8, "num_gpus": 0.0}, "simulation.client_resources.num_cpus=8: must fit one node "
     "of the Ray cluster at h:1 (its nodes: CPUs [4.0, 2.0], GPUs [1.0, 0])"),
    ({"num_cpus": 1, "num_gpus": 2}, "simulation.client_resources.num_gpus=2: must fit one node"),
])
def test_clients_that_fit_no_node_are_refused(monkeypatch, resources, message):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: NODES)

    with pytest.raises(ConfigError) as err:
        ray_cluster.check_cluster(resources, "h:1")
    assert str(err.value).startswith(message), str(err.value)


# --- a node's copy of the prepared data -----------------------------------------------------------
@pytest.fixture
def node(monkeypatch, tmp_path):
    """A node that keeps its data in a folder of its own (FEDKD_NODE_CACHE_DIR)."""
    monkeypatch.setenv(ship.NODE_CACHE_ENV, str(tmp_path / "node"))
    ship._ensure.cache_clear()
    yield tmp_path / "node"
    ship._ensure.cache_clear()


def _files(folder: str | Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_without_a_node_folder_the_driver_folder_is_read(small_run, monkeypatch):
    monkeypatch.delenv(ship.NODE_CACHE_ENV, raising=False)
    ship._ensure.cache_clear()

    assert ship.ensure_cache(small_run.settings.data) == small_run.data.cache_dir


def test_a_node_fetches_the_shipped_files_once(small_run, node, monkeypatch):
    calls = []
    monkeypatch.setattr(ship, "shipped_files",
                        lambda announced: calls.append(announced) or _files(announced))

    folder = ship.ensure_cache(small_run.settings.data)
    ship._ensure.cache_clear()  # another process of the node: the copy is there
    again = ship.ensure_cache(small_run.settings.data)

    assert folder == again == str(node / Path(small_run.data.cache_dir).name)
    assert _files(folder) == _files(small_run.data.cache_dir) and len(calls) == 1
    assert [p.name for p in node.iterdir() if not p.name.startswith(".")] == [Path(folder).name]


def test_a_node_without_the_data_and_no_driver_shipping_it_names_the_variable(small_run, node):
    with pytest.raises(ConfigError, match=f"no prepared data in .* on this node "
                                          f"\\({ship.NODE_CACHE_ENV}=.*no Ray driver ships"):
        ship.ensure_cache(small_run.settings.data)


def test_shipped_files_of_other_data_are_refused_and_not_kept(small_run, node, monkeypatch):
    monkeypatch.setattr(ship, "shipped_files", lambda announced: _files(announced))
    other = {**small_run.settings.data, "partition_hash": "0" * 16}

    with pytest.raises(ConfigError, match="is not the announced one"):
        ship.ensure_cache(other)
    assert not (node / Path(small_run.data.cache_dir).name).exists()


# --- a two-node cluster on this machine (slow) ----------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", ship.NODE_CACHE_ENV, "FEDKD_CACHE_DIR")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **extra}


class Node:
    """One ``ray start --block`` process (a head or a worker node), in a session of its own."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([RAY, "start", "--block", *args], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)
        self.tree: list[psutil.Process] = []

    def wait_started(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < end, self.log.read_text()[-3000:]
            time.sleep(0.5)
        self.remember()

    def remember(self) -> None:
        """Note this node's processes (Ray's daemons and workers) to end them for sure later."""
        try:
            root = psutil.Process(self.proc.pid)
            self.tree = [root, *root.children(recursive=True), *self.tree]
        except psutil.Error:
            pass

    def stop(self) -> None:
        """SIGTERM (``ray start --block`` then stops its node), then SIGKILL what is left."""
        self.remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        left = [p for p in {p.pid: p for p in self.tree}.values() if p.is_running()]
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        if self.proc.poll() is None:
            self.proc.wait(10)


def _simulate(out: Path, cache: Path, *overrides: str) -> tuple[dict, pd.DataFrame]:
    cmd = [sys.executable, "-m", "fedkd.simulations.main", *TINY, f"simulation.cache_dir={cache}",
           f"hydra.run.dir={out}", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    frame = pd.read_parquet(out / "metrics.parquet")
    acc = frame[frame.metric == "test-accuracy"].sort_values(["round", "client"])
    return json.loads((out / "summary.json").read_text()), acc.reset_index(drop=True)


@pytest.mark.slow
def test_a_two_node_cluster_gives_the_single_node_results(tmp_path):
    summary_local, acc_local = _simulate(tmp_path / "local", tmp_path / "driver-cache",
                                         "simulation.ray_init.num_cpus=2")
    temp = Path(tempfile.mkdtemp(prefix="fkr", dir="/tmp"))  # Ray's socket paths must stay short
    worker_cache = tmp_path / "worker-cache"
    gcs, client, *agents = free_ports(8)
    nodes: list[Node] = []
    try:
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp),
                  "--disable-usage-stats"]
        nodes.append(Node(["--head", "--port", str(gcs), "--ray-client-server-port", str(client),
                           "--include-dashboard", "false", *common,
                           "--dashboard-agent-listen-port", str(agents[0]),
                           "--dashboard-agent-grpc-port", str(agents[1]),
                           "--runtime-env-agent-port", str(agents[2])],
                          tmp_path / "head.log", _env()))
        nodes[0].wait_started()
        nodes.append(Node(["--address", f"127.0.0.1:{gcs}", *common,
                           "--dashboard-agent-listen-port", str(agents[3]),
                           "--dashboard-agent-grpc-port", str(agents[4]),
                           "--runtime-env-agent-port", str(agents[5])],
                          tmp_path / "worker.log", _env(**{ship.NODE_CACHE_ENV: str(worker_cache)})))
        nodes[1].wait_started()

        summary, acc = _simulate(tmp_path / "cluster", tmp_path / "driver-cache",
                                 f"simulation.ray_init.address=127.0.0.1:{gcs}")
        for node in nodes:
            node.remember()
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp, ignore_errors=True)

    assert summary["status"] == summary_local["status"] == "ok"
    assert summary["partition_hash"] == summary_local["partition_hash"]
    pd.testing.assert_frame_equal(acc[["round", "client", "value"]],
                                  acc_local[["round", "client", "value"]], check_exact=True)
    assert summary["final_accuracy_by_client"] == summary_local["final_accuracy_by_client"]
    driver_log = (tmp_path / "cluster" / "main.log").read_text()
    assert "2 node(s), CPUs [1.0, 1.0], GPUs [0, 0]: 2 client(s) at once" in driver_log
    key = next(p.name for p in (tmp_path / "driver-cache").iterdir() if not p.name.startswith("."))
    copied = worker_cache / key  # the worker node ran clients on its own copy of the data
    assert copied.is_dir(), ("the worker node read the driver's folder: fedkd.client.data must "
                             "read through fedkd.data.ship.ensure_cache(settings.data)")
    assert _files(copied) == _files(tmp_path / "driver-cache" / key)
    assert not [p for n in nodes for p in n.tree if p.is_running()]


@pytest.mark.parametrize(("address", "inline"), [(None, str(4 * 2**20)), ("10.0.0.1:6379", None)])
def test_a_ray_started_here_answers_inline_and_a_cluster_keeps_its_settings(
        monkeypatch, address, inline):
    import ray

    seen = {}
    monkeypatch.delenv("RAY_max_direct_call_object_size", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(
        inline=os.environ.get("RAY_max_direct_call_object_size"), kwargs=kwargs))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the test's changes stay here

    ray_cluster.init_ray({"address": address} if address else {})

    assert seen["inline"] == inline
