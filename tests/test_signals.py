"""Clean stops: SIGINT/SIGTERM end a simulation fast, with a summary and no process left behind.

Failures, too, leave their message in ``summary.json``, even one Flower drops.
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

import pandas as pd
import psutil
import pytest
from flwr.serverapp import Grid, ServerApp

from fedkd.server import compose_config
from fedkd.simulations import launch
from fedkd.simulations.run import Interrupted, StopSignals, run
from tests.conftest import SMALL

SCRIPT = Path(sys.executable).with_name("fedkd-sim")
COMMAND = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "fedkd.simulations.main"]
STOP_WITHIN_S = 10.0
START_TIMEOUT_S = 300.0  # data, Ray and two rounds on a busy two-core machine


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _start(out: Path, cache: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """`fedkd-sim` with 4 clients and 20 rounds in its own session; its output is collected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "RAY_"))}
    env.update(FEDKD_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [*COMMAND, "num_clients=4", "num_rounds=20", f"hydra.run.dir={out}"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen[str]) -> None:
    end = time.monotonic() + START_TIMEOUT_S
    while not any(text in line for line in list(lines)):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"no {text!r} in the output (exit {proc.returncode}):\n{''.join(lines)}")
        time.sleep(0.05)


def _running(procs: list[psutil.Process]) -> list[str]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {proc.name()}")
        except psutil.Error:
            pass
    return left


def _in_session(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


def _stop_mid_run(tmp_path: Path, cache: Path, signum: int, to_group: bool) -> None:
    """Start a run, signal it mid-round 3, check exit code, time, summary and processes."""
    out = tmp_path / "out"
    proc, lines = _start(out, cache)
    try:
        _wait_for(lines, "round 2/", proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert any("ClientAppActor" in p.name() for p in tree), [p.name() for p in tree]
        start = time.monotonic()
        if to_group:  # as Ctrl-C does: the whole foreground process group
            os.killpg(proc.pid, signum)
        else:  # as `kill` does
            os.kill(proc.pid, signum)
        code = proc.wait(timeout=60)
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines)
    assert code == 128 + signum, output
    assert seconds < STOP_WITHIN_S, output
    assert "Segmentation fault" not in output and "Traceback" not in output, output
    deadline = time.monotonic() + 10  # killed processes need a moment to vanish
    while (_running(tree) or _running(_in_session(proc.pid))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(tree) == [] and _running(_in_session(proc.pid)) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] is None
    assert summary["stop_signal"] == signal.Signals(signum).name
    assert 2 <= summary["last_round"] < 20
    assert summary["final_mean_accuracy"] > 0.1
    acc = pd.read_parquet(out / "metrics.parquet").query("metric == 'test-accuracy'")
    assert sorted(acc["round"].unique()) == list(range(1, summary["last_round"] + 1))


@pytest.mark.slow  # a Ray simulation; the default suite keeps one (tests/test_simulation.py)
def test_ctrl_c_stops_a_simulation_cleanly(tmp_path, cache):
    _stop_mid_run(tmp_path, cache, signal.SIGINT, to_group=True)


@pytest.mark.slow
def test_sigterm_stops_a_simulation_cleanly(tmp_path, cache):
    _stop_mid_run(tmp_path, cache, signal.SIGTERM, to_group=False)


def test_stop_signals_raise_outside_the_simulation_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        stop = StopSignals()
        stop.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between two bytecodes
        finally:
            stop.restore()
    assert stopped.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is before


@pytest.fixture
def cfg(cache):
    return compose_config([*SMALL, f"simulation.cache_dir={cache}"])


def test_a_stop_between_rounds_keeps_the_completed_rounds(cfg, tmp_path):
    def runner(prepared, recorder):
        for server_round in (1, 2):
            recorder.record(server_round, 0, "test-accuracy", 0.4 + server_round / 10)
            recorder.end_round(server_round)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        raise AssertionError("the signal did not stop the run")

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where a shell started us in background
    with pytest.raises(Interrupted):
        run(cfg, tmp_path / "out", runner=runner, stop=StopSignals())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stop_signal"] == "SIGINT"
    assert summary["last_round"] == 2 and summary["final_mean_accuracy"] == pytest.approx(0.6)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored


def _failing_server_app(*_, **__) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:  # noqa: ARG001
        raise ValueError("strategy exploded in round 3")

    return app


@pytest.mark.parametrize("flower", ["masks", "drops"])
def test_a_server_app_failure_reaches_the_summary(cfg, tmp_path, monkeypatch, flower):
    """Flower runs the ServerApp in a thread; its error must not get lost on the way."""
    import flwr.simulation
    import ray

    def run_simulation(server_app, **_):
        thread = threading.Thread(target=lambda: _swallow(server_app))
        thread.start()
        thread.join()
        if flower == "masks":
            raise RuntimeError("An error was encountered. Ending simulation.")

    def _swallow(server_app):
        try:
            server_app(grid=None, context=None)
        except Exception:  # noqa: BLE001 - as Flower's server thread does
            pass

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    monkeypatch.setattr(launch, "make_server_app", _failing_server_app)
    monkeypatch.setattr(launch, "init_ray", lambda _: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(ValueError, match="exploded"):
        run(cfg, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed" and "ValueError: strategy exploded" in summary["error"]


def test_a_failure_without_a_message_is_never_null(tmp_path):
    from fedkd.simulations.results import Recorder

    summary = Recorder(tmp_path, ["mlp"], {"num_rounds": 1}).finish(status="failed")
    assert summary["error"] and summary["last_round"] == 0
