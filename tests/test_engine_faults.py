"""Faults of the simulation engine that must neither hang a run nor spread through it.

- An engine that dies under the ServerApp ends the run ``failed`` with the engine's message at
  once, not after the round timeout (fast: Flower's engine stood in for; slow: Ray's GCS server
  of a real `fedkd-sim` run killed).
- A ClientApp worker that crashes is replaced: the other clients, and later rounds, go on
  (fast: Flower's RayBackend and actor pool with Ray stood in for; slow: a real simulation).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import ray
from flwr.serverapp import ServerApp

from fedkd.errors import ConfigError
from fedkd.server import compose_config
from fedkd.simulations import engine, launch
from fedkd.simulations.run import StopSignals, run
from tests.conftest import SMALL
from tests.helpers import FakeGrid

REPO = Path(__file__).resolve().parents[1]
ENGINE_DEATH_WITHIN_S = 30.0  # issue 11: the engine-death case exits within 30 s
FAKE_ENGINE_DIES_AFTER_S = 0.5


@pytest.fixture
def cfg(small_run):
    """The small config with a round timeout far beyond any test's patience."""
    return compose_config([*SMALL, f"simulation.cache_dir={small_run.cfg.simulation.cache_dir}",
                           "simulation.round_timeout=600"])


@pytest.fixture
def sleeper(monkeypatch):
    """A process that stands in for one of Ray's core processes (the test ends it) of a Ray
    that is up."""
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield psutil.Process(proc.pid)
    proc.kill()
    proc.wait()


@pytest.fixture
def no_ray(monkeypatch, flower_ids):
    """`launch.simulate` without Ray: nothing started, nothing shut down (messages need ids)."""
    monkeypatch.setattr(launch, "init_ray", lambda _: None)
    monkeypatch.setattr(launch, "pipeline_actors", lambda depth: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)


def _fake_engine(monkeypatch, engine, threads: list[threading.Thread]) -> None:
    """Flower's `run_simulation` as `engine(server_thread)`: the ServerApp runs in a thread on a
    grid whose nodes never answer, as Flower's does; `threads` gets that thread."""
    import flwr.simulation

    def run_simulation(server_app: ServerApp, **_):
        grid = FakeGrid([1, 2, 3, 4])
        grid.silent.update(grid.nodes)
        thread = threading.Thread(target=_serve, args=(server_app, grid), daemon=True)
        threads.append(thread)
        thread.start()
        engine(thread)

    def _serve(server_app, grid):
        try:
            server_app(grid=grid, context=None)
        except Exception:  # noqa: BLE001 - Flower's server thread keeps it for later
            pass

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)


def _run_timed(cfg, out: Path) -> tuple[BaseException, float, dict]:
    start = time.monotonic()
    with pytest.raises(Exception) as raised:
        run(cfg, out)
    return raised.value, time.monotonic() - start, json.loads((out / "summary.json").read_text())


# --- Ray's helpers end with the ServerApp -------------------------------------------------
def test_ray_s_helpers_are_stopped_at_once_and_nothing_else():
    from fedkd.simulations.engine import AUXILIARY_SCRIPTS, stop_auxiliary

    sleep = "import sys, time; time.sleep(120)"
    helpers = [subprocess.Popen([sys.executable, "-c", sleep, f"/x/site-packages/{script}"])
               for script in AUXILIARY_SCRIPTS]
    others = [subprocess.Popen([sys.executable, "-c", sleep, arg])
              for arg in ("/x/site-packages/ray/core/src/ray/raylet/raylet", "ray::IDLE")]
    try:
        procs = [psutil.Process(p.pid) for p in helpers + others]
        stopped = stop_auxiliary(procs)
        assert sorted(p.pid for p in stopped) == sorted(p.pid for p in helpers)
        assert all(p.wait(timeout=5) is not None for p in helpers)
        assert all(p.poll() is None for p in others)
    finally:
        for p in helpers + others:
            p.kill()
            p.wait()


def test_only_the_helpers_of_a_ray_started_here_are_stopped(monkeypatch):
    stopped = []
    monkeypatch.setattr(launch, "stop_auxiliary", stopped.append)
    monkeypatch.setattr(launch, "child_processes", lambda since: ["helper"])
    inner = ServerApp()

    @inner.main()
    def main(grid, context):
        pass

    for local in (True, False):  # False: a cluster joined; its head's helpers are not ours
        outcome = launch._Outcome()
        outcome.local_ray = local
        launch.guarded_app(inner, StopSignals(), outcome)(grid=FakeGrid([1]), context=None)
        assert outcome.server_done.is_set()
    assert stopped == [["helper"]]


# --- engine death: fast ---------------------------------------------------------------------
def test_the_watch_declares_an_ended_engine_process_with_its_pid(sleeper):
    watch = launch.EngineWatch([sleeper], interval=0.05).start()
    assert not watch.dead.wait(0.3)

    sleeper.kill()

    assert watch.dead.wait(2.0)
    assert watch.reason == f"Ray's {sleeper.name()} (pid {sleeper.pid}) ended"
    watch.declare("something later")
    assert watch.reason.endswith(f"(pid {sleeper.pid}) ended")  # the first reason stays


def test_a_closed_watch_declares_nothing(sleeper):
    watch = launch.EngineWatch([sleeper], interval=0.05).start()
    watch.close()  # Ray is shut down on purpose next

    sleeper.kill()

    assert not watch.dead.wait(0.5)


def test_a_process_ended_during_a_stop_is_no_death(sleeper):
    stopping = threading.Event()
    watch = launch.EngineWatch([sleeper], interval=0.05, stopping=stopping).start()
    stopping.set()  # Ctrl-C: the signal reaches Ray's processes too

    sleeper.kill()

    assert not watch.dead.wait(0.5)


def test_a_process_ended_by_ray_shutdown_is_no_death(sleeper, monkeypatch):
    watch = launch.EngineWatch([sleeper], interval=0.05).start()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # disconnected, then ends them

    sleeper.kill()

    assert not watch.dead.wait(0.5)


def test_engine_processes_are_ray_s_core_processes_started_since(sleeper, monkeypatch):
    monkeypatch.setattr(engine, "child_processes", lambda since: [sleeper])
    assert launch.engine_processes(0.0) == []
    monkeypatch.setattr(engine, "proc_name", lambda proc: "raylet")
    assert launch.engine_processes(0.0) == [sleeper]


def test_an_engine_that_raises_under_the_server_app_fails_the_run_at_once(
        cfg, tmp_path, monkeypatch, no_ray):
    """Flower's engine raises (e.g. its actor pool cannot be built) and returns without waiting
    for the ServerApp, which would wait out the 600 s round timeout."""
    threads: list[threading.Thread] = []

    def engine(server_thread):
        time.sleep(FAKE_ENGINE_DIES_AFTER_S)
        try:
            raise ZeroDivisionError("float division by zero")
        except ZeroDivisionError as err:
            raise RuntimeError("Simulation Runtime crashed.") from err

    _fake_engine(monkeypatch, engine, threads)

    err, seconds, summary = _run_timed(cfg, tmp_path / "out")

    assert isinstance(err, launch.EngineDied)
    assert seconds < 10.0
    assert not threads[0].is_alive()  # the ServerApp has returned: nothing left to wait for
    assert summary["status"] == "failed" and summary["last_round"] == 0
    assert summary["error"].startswith("EngineDied: ZeroDivisionError: float division by zero")


def test_an_engine_process_that_ends_fails_the_run_at_once(
        cfg, tmp_path, monkeypatch, no_ray, sleeper):
    """Ray's GCS server (here: a stand-in) ends mid-run; Flower's engine notices nothing."""
    threads: list[threading.Thread] = []
    monkeypatch.setattr(launch, "engine_processes", lambda since: [sleeper])

    def engine(server_thread):
        time.sleep(FAKE_ENGINE_DIES_AFTER_S)
        sleeper.kill()
        server_thread.join(timeout=20.0)  # Flower waits for its ServerApp (bounded here)

    _fake_engine(monkeypatch, engine, threads)

    err, seconds, summary = _run_timed(cfg, tmp_path / "out")

    assert isinstance(err, launch.EngineDied), err
    assert seconds < 10.0
    assert summary["status"] == "failed"
    assert summary["error"] == f"EngineDied: Ray's {sleeper.name()} (pid {sleeper.pid}) ended"


def test_an_engine_that_returns_under_the_server_app_fails_the_run(
        cfg, tmp_path, monkeypatch, no_ray):
    threads: list[threading.Thread] = []
    _fake_engine(monkeypatch, lambda server_thread: time.sleep(FAKE_ENGINE_DIES_AFTER_S), threads)

    err, seconds, summary = _run_timed(cfg, tmp_path / "out")

    assert isinstance(err, launch.EngineDied) and seconds < 10.0
    assert not threads[0].is_alive()
    assert summary["error"] == "EngineDied: the simulation engine stopped"


# --- engine death: a real run ---------------------------------------------------------------
@pytest.mark.slow  # a Ray simulation; the default suite keeps one (tests/test_simulation.py)
def test_fedkd_sim_whose_gcs_server_dies_exits_failed_within_30_s(tmp_path, small_run):
    """Without the watch, Ray's driver ends the process 60 s later with no summary written."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "RAY_"))}
    env.update(FEDKD_CACHE_DIR=str(small_run.cfg.simulation.cache_dir), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedkd.simulations.main", *SMALL, "num_rounds=40",
         "simulation.round_timeout=600", f"hydra.run.dir={out}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any("round 2/" in line for line in list(lines)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        [gcs] = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.name().startswith("gcs_server")]
        start = time.monotonic()
        gcs.kill()
        code = proc.wait(timeout=120)
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines)
    print(f"engine death: the process exited {seconds:.1f} s after the GCS server was killed")
    assert seconds < ENGINE_DEATH_WITHIN_S, output
    assert code == 1, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert summary["error"] == f"EngineDied: Ray's gcs_server (pid {gcs.pid}) ended"
    assert 2 <= summary["last_round"] < 40 and summary["final_mean_accuracy"] > 0.3


# --- a crashed ClientApp worker: fast ------------------------------------------------------
class FakeActor:
    """Stands in for a Ray actor handle: ``run.remote(...)`` returns the future ``<name>``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.run = SimpleNamespace(remote=lambda *args: name)


@pytest.fixture
def backend(monkeypatch):
    """Flower's RayBackend and BasicActorPool, patched by fedkd, on fake actors: the actor
    ``crashing`` dies under its task, the others answer; `killed` lists what `ray.kill` got."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    from fedkd.flower_compat import replace_crashed_actors

    monkeypatch.setattr(BasicActorPool, "fetch_result_and_return_actor_to_pool",
                        BasicActorPool.fetch_result_and_return_actor_to_pool)  # undone after
    replace_crashed_actors()
    replace_crashed_actors()  # idempotent

    def get(future):
        if future == "crashing":
            raise ray.exceptions.ActorDiedError()
        return "cid", f"reply from {future}", "context"

    killed: list[str] = []
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: killed.append(actor.name))
    pool = BasicActorPool.__new__(BasicActorPool)  # no Ray cluster to size it from
    pool.pool, pool.num_actors, pool._future_to_actor = [FakeActor("ok")], 2, {}
    pool.create_actor_fn = lambda: FakeActor("fresh")
    engine = RayBackend.__new__(RayBackend)
    engine.pool, engine.app_fn = pool, lambda: None
    return SimpleNamespace(engine=engine, pool=pool, killed=killed)


def _process(engine):
    return engine.process_message(None, SimpleNamespace(node_config={"partition-id": 0}))


def test_a_crashed_actor_is_replaced_and_its_message_still_fails(backend):
    backend.pool.pool.append(FakeActor("crashing"))  # taken first (the pool pops its last)

    with pytest.raises(ray.exceptions.ActorDiedError):
        _process(backend.engine)

    assert [a.name for a in backend.pool.pool] == ["ok", "fresh"]  # Flower: ["ok", "crashing"]
    assert backend.killed == ["crashing"] and backend.pool._future_to_actor == {}
    assert [_process(backend.engine)[0] for _ in range(3)] == ["reply from fresh"] * 3


def test_an_application_error_keeps_its_actor(backend, monkeypatch):
    def get(future):
        raise ValueError("the ClientApp raised")  # Ray's RayTaskError: the actor lives on

    monkeypatch.setattr(ray, "get", get)

    with pytest.raises(ValueError):
        _process(backend.engine)

    assert [a.name for a in backend.pool.pool] == ["ok"] and backend.killed == []


# --- ClientApp actors that hold two messages (simulation.pipeline) ---------------------------
class QueueActor:
    """A fake actor handle whose ``run.remote`` returns a new future ``(name, n)`` each call;
    `terminated` counts ``terminate.remote`` calls."""

    def __init__(self, name: str) -> None:
        self.name, self.calls, self.terminated = name, 0, 0

        def remote(*args):
            self.calls += 1
            return (self.name, self.calls, args[2])  # args: app_fn, message, cid, context

        def terminate():
            self.terminated += 1

        self.run = SimpleNamespace(remote=remote)
        self.terminate = SimpleNamespace(remote=terminate)


@pytest.fixture
def slots(monkeypatch):
    """Flower's RayBackend and pool with two slots per actor, on `QueueActor`s: a future of an
    actor named in `dead` raises ActorDiedError; `killed` lists what `ray.kill` got."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    from fedkd.flower_compat import pipeline_actors

    for name in ("fetch_result_and_return_actor_to_pool", "add_actor_back_to_pool",
                 "add_actors_to_pool", "submit", "terminate_all_actors"):
        monkeypatch.setattr(BasicActorPool, name, getattr(BasicActorPool, name))  # undone after
    monkeypatch.setattr(BasicActorPool, "fedkd_depth", 1, raising=False)
    pipeline_actors(2)
    dead: set[str] = set()

    def get(future):
        if future[0] in dead:
            raise ray.exceptions.ActorDiedError()
        return "cid", f"reply to {future[2]} from {future[0]}", "context"

    killed: list[str] = []
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: killed.append(actor.name))
    names = iter(["a", "b", "fresh", "fresh2"])
    pool = BasicActorPool.__new__(BasicActorPool)
    pool.pool, pool.num_actors, pool._future_to_actor = [], 0, {}
    pool.create_actor_fn = lambda: QueueActor(next(names))
    pool.add_actors_to_pool(2)
    engine = RayBackend.__new__(RayBackend)
    engine.pool, engine.app_fn = pool, lambda: None
    return SimpleNamespace(engine=engine, pool=pool, killed=killed, dead=dead)


def _message(engine, cid):
    return engine.process_message(None, SimpleNamespace(node_config={"partition-id": cid}))


def test_each_actor_has_two_slots_and_flower_a_worker_per_slot(slots):
    assert [a.name for a in slots.pool.pool] == ["a", "b", "a", "b"]
    assert slots.pool.num_actors == 4 and slots.engine.num_workers == 4
    futures = [slots.pool.submit(lambda a, *job: a.run.remote(*job), (None, None, c, None))
               for c in range(4)]
    assert [f[0] for f in futures] == ["b", "a", "b", "a"]  # both actors first, then queued
    assert slots.pool.pool == []
    assert [slots.pool.fetch_result_and_return_actor_to_pool(f)[0] for f in futures] == [
        "reply to 0 from b", "reply to 1 from a", "reply to 2 from b", "reply to 3 from a"]
    assert sorted(a.name for a in slots.pool.pool) == ["a", "a", "b", "b"]
    slots.pool.terminate_all_actors()
    assert sorted(a.terminated for a in {id(a): a for a in slots.pool.pool}.values()) == [1, 1]


def test_a_crash_fails_the_message_that_ran_and_reruns_the_one_queued_behind(slots):
    run = lambda a, *job: a.run.remote(*job)  # noqa: E731
    first = slots.pool.submit(run, (None, None, "ran", None))    # to b
    other = slots.pool.submit(run, (None, None, "other", None))  # to a
    queued = slots.pool.submit(run, (None, None, "queued", None))  # to b, behind "ran"
    slots.dead.add("b")

    with pytest.raises(ray.exceptions.ActorDiedError):
        slots.pool.fetch_result_and_return_actor_to_pool(first)
    slots.pool.add_actor_back_to_pool(first)  # as Flower's process_message does on an error
    assert slots.killed == ["b"]
    assert slots.pool.fetch_result_and_return_actor_to_pool(queued)[0] == "reply to queued from fresh"
    assert slots.pool.fetch_result_and_return_actor_to_pool(other)[0] == "reply to other from a"
    assert sorted(a.name for a in slots.pool.pool) == ["a", "a", "fresh", "fresh"]  # b's: fresh's
    assert not any(slots.pool.fedkd_lines.values()) and slots.pool.fedkd_jobs == {}


def test_a_queued_message_that_crashes_the_fresh_actor_too_fails(slots):
    run = lambda a, *job: a.run.remote(*job)  # noqa: E731
    first = slots.pool.submit(run, (None, None, "ran", None))
    slots.pool.submit(run, (None, None, "other", None))
    queued = slots.pool.submit(run, (None, None, "queued", None))
    slots.dead.update({"b", "fresh"})
    with pytest.raises(ray.exceptions.ActorDiedError):
        slots.pool.fetch_result_and_return_actor_to_pool(queued)  # its turn comes first here
    assert slots.killed == ["b", "fresh"]
    with pytest.raises(ray.exceptions.ActorDiedError):
        slots.pool.fetch_result_and_return_actor_to_pool(first)
    assert slots.killed == ["b", "fresh"]  # b is replaced once


def test_the_threads_of_a_dead_actor_s_messages_share_one_replacement(slots, monkeypatch):
    """Flower fetches each message in its own thread: both failures of a dead actor must get the
    same fresh actor (a second one would wait forever for a CPU)."""
    run = lambda a, *job: a.run.remote(*job)  # noqa: E731
    first = slots.pool.submit(run, (None, None, "ran", None))
    slots.pool.submit(run, (None, None, "other", None))
    queued = slots.pool.submit(run, (None, None, "queued", None))
    slots.dead.add("b")
    create = slots.pool.create_actor_fn
    created = []

    def slow_create():  # the window in which a second thread would create a second actor
        time.sleep(0.2)
        created.append(create())
        return created[-1]

    slots.pool.create_actor_fn = slow_create
    results = {}

    def fetch(name, future):
        try:
            results[name] = slots.pool.fetch_result_and_return_actor_to_pool(future)[0]
        except ray.exceptions.ActorDiedError:
            results[name] = "error"

    threads = [threading.Thread(target=fetch, args=item)
               for item in (("ran", first), ("queued", queued))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert [a.name for a in created] == ["fresh"]
    assert results == {"ran": "error", "queued": "reply to queued from fresh"}


def test_pipeline_depth_is_one_with_hanging_or_dropped_out_clients(small_run):
    from fedkd.simulations.faults import fault_plan

    def depth(*overrides: str) -> int:
        cfg = compose_config([*SMALL, f"simulation.cache_dir={small_run.cfg.simulation.cache_dir}",
                              *overrides])
        return launch.pipeline_depth(cfg, fault_plan(cfg))

    assert depth() == 2
    assert depth("simulation.pipeline=3") == 3
    for kind in ("hang", "dropout"):
        assert depth(f"faults={kind}") == 1
    assert depth("faults=crash") == 2


def test_a_pipeline_below_one_is_refused(small_run):
    from fedkd.checks import check_wire

    with pytest.raises(ConfigError, match="simulation.pipeline"):
        check_wire(compose_config([*SMALL, "simulation.pipeline=0"]).simulation)


# --- a crashed ClientApp worker: a real simulation -----------------------------------------
@pytest.mark.slow  # a Ray simulation (about a minute on two cores)
def test_a_client_whose_worker_crashes_misses_one_round_and_the_others_none(
        small_run, tmp_path, monkeypatch):
    import fedkd.client.app
    from tests.faulty_client import CrashingClientApp

    monkeypatch.setattr(fedkd.client.app, "app", CrashingClientApp(fedkd.client.app.app, 1, 2))
    cfg = compose_config([*SMALL, "num_rounds=4",
                          f"simulation.cache_dir={small_run.cfg.simulation.cache_dir}"])

    summary = run(cfg, tmp_path)

    assert summary["status"] == "degraded"
    assert summary["status_reasons"][0] == "client 1 failed in 1 of 4 training rounds: round 2"
    assert "worker process has died" in summary["status_reasons"][1]
    assert len(summary["status_reasons"]) == 2
    assert summary["final_accuracy_round_by_client"] == {str(c): 4 for c in range(4)}


# --- a multirun with failing arms ----------------------------------------------------------
def _sweep(sweep: Path, *overrides: str) -> list[str]:
    return ["-m", *overrides, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=arm${hydra.job.num}"]


def _summaries(sweep: Path) -> dict[str, dict]:
    return {arm.name: json.loads((arm / "summary.json").read_text())
            for arm in sorted(sweep.iterdir()) if arm.is_dir()}


def test_a_multirun_goes_on_past_failed_arms_and_exits_1_naming_them(tmp_path, monkeypatch):
    """Hydra's multirun in this process, `run` stood in for: a config error (no summary of its
    own), a valid arm, a failed run (its own summary), a valid arm."""
    from fedkd.errors import ConfigError
    from fedkd.simulations import main as cli

    ran: list[int] = []

    def run(cfg, out_dir, stop):
        ran.append(int(cfg.seed))
        if cfg.seed == 0:
            raise ConfigError("seed=0 is not allowed here")
        status = "failed" if cfg.seed == 2 else "ok"
        (Path(out_dir) / "summary.json").write_text(json.dumps({"status": status}))
        if cfg.seed == 2:
            raise RuntimeError("no client reported a test accuracy")
        return {"final_mean_accuracy": 0.9}

    monkeypatch.setattr(cli, "run", run)
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["fedkd-sim", *_sweep(sweep, "seed=0,1,2,3")])

    with pytest.raises(SystemExit) as exited:
        cli.main()

    assert exited.value.code == 1
    assert ran == [0, 1, 2, 3]
    summaries = _summaries(sweep)
    assert {name: s["status"] for name, s in summaries.items()} == {
        "arm0": "failed", "arm1": "ok", "arm2": "failed", "arm3": "ok"}
    assert summaries["arm0"] == {
        "status": "failed", "error": "configuration error: seed=0 is not allowed here",
        "last_round": 0, "status_reasons": ["configuration error: seed=0 is not allowed here"]}
    assert cli.FAILED_ARMS == [str(sweep / "arm0"), str(sweep / "arm2")]


@pytest.mark.slow  # a fedkd-sim process with four arms (no Ray): about a minute on two cores
def test_fedkd_sim_multirun_goes_on_past_failed_arms(tmp_path, small_run):
    """Four arms of the pooled baseline: two config errors, a valid arm, a runner refused for an
    option it does not take. The valid arm runs; each failure is in its own folder; the process
    exits 1 naming them."""
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "RAY_"))}
    env.update(FEDKD_CACHE_DIR=str(small_run.cfg.simulation.cache_dir), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))

    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.simulations.main", *_sweep(
            sweep, "strategy=centralized", "num_rounds=1", "strategy.runner.epochs_per_round=1",
            "num_clients=0,3",
            "strategy.runner._target_=fedkd.simulations.centralized.train_pooled,builtins.len")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-5000:]
    summaries = _summaries(sweep)
    assert {name: s["status"] for name, s in summaries.items()} == {
        "arm0": "failed", "arm1": "failed", "arm2": "ok", "arm3": "failed"}
    assert summaries["arm0"]["error"] == "configuration error: num_clients=0: must be an int >= 1"
    assert summaries["arm3"]["error"] == (  # refused before it runs, as any runner option is
        "configuration error: strategy.runner.epochs_per_round=1: is not an option of "
        "builtins.len; options: []")
    assert summaries["arm2"]["final_mean_accuracy"] > 0.5
    [last] = [line for line in output.splitlines() if "arm(s) of the multirun failed" in line]
    assert last.split("failed (summary.json in each): ")[1].split(", ") == [
        str(sweep / arm) for arm in ("arm0", "arm1", "arm3")]
