"""The one adapter that launches Flower's simulation engine (Ray backend).

Everything else in fedkd talks to Flower through ServerApp/ClientApp and the Grid; only this
module knows how a simulation is started, and how it stops.

Flower 1.42 runs the ServerApp in a thread and the Ray backend's workers in the main thread
(`flwr.simulation.run_simulation`, deprecated in favour of ``flwr run``, which needs a
SuperLink). An exception thrown into the main thread while workers wait in ``ray.get`` makes
Flower shut Ray down under them: a segfault. So a stop (SIGINT/SIGTERM, see
`fedkd.simulations.run.StopSignals`) only sets a flag here; the Grid handed to the ServerApp
raises `Interrupted` at its next call, the ServerApp returns, and Flower winds its workers
down and shuts Ray down in order. Ray is started here (before Flower would) so that our signal
handlers replace the ones ``ray.init`` installs, and its processes are reaped afterwards.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fedkd.server import PreparedRun, make_server_app
from fedkd.simulations.results import Recorder
from fedkd.simulations.run import (
    Interrupted, StopSignals, active_stop, kill_and_wait, running,
)

log = logging.getLogger(__name__)

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
REAP_TIMEOUT_S = 1.0  # how long killed leftovers may take to vanish after ray.shutdown()


@contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Keep Flower's INFO chatter at WARNING unless `verbose` (its warnings still show)."""
    loggers = [logging.getLogger(name) for name in ("flwr", "alembic")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        if not verbose:
            lg.setLevel(logging.WARNING)
        if lg.handlers:  # Flower prints through its own handler: once, not again via the root
            lg.propagate = False
    try:
        yield
    finally:
        for lg, (level, propagate) in zip(loggers, saved):
            lg.setLevel(level)
            lg.propagate = propagate


def backend_config(sim: Any) -> dict[str, Any]:
    """Ray backend settings from the `simulation` config group."""
    init_args = {k: v for k, v in OmegaConf.to_container(sim.ray_init, resolve=True).items()
                 if v is not None}
    return {
        "client_resources": OmegaConf.to_container(sim.client_resources, resolve=True),
        "init_args": init_args,
    }


def init_ray(init_args: dict[str, Any]) -> None:
    """Start Ray as Flower's RayBackend would (it skips ``ray.init`` when Ray is up)."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)  # Ray workers get the driver's sys.path
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
             **{"include_dashboard": False, **init_args})


class StopGrid(Grid):
    """Grid that raises `Interrupted` at its next call once `stop` is asked to stop."""

    def __init__(self, grid: Grid, stop: StopSignals) -> None:
        self._grid, self._stop = grid, stop

    def _check(self) -> None:
        if self._stop.event.is_set():
            raise Interrupted(self._stop.signum or signal.SIGINT)

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._grid.set_run(run)

    @property
    def run(self) -> Any:  # noqa: D102
        return self._grid.run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        self._check()
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        self._check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # noqa: D102
        self._check()
        return self._grid.send_and_receive(messages, timeout=timeout)


class _Outcome:
    """What the ServerApp thread leaves behind: its error, Ray's processes while they ran."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.processes: list[Any] = []
        self.started = time.time()  # processes started since are the simulation's


def guarded_app(inner: ServerApp, stop: StopSignals, outcome: _Outcome) -> ServerApp:
    """`inner` on a `StopGrid`: a stop ends it quietly, an error is kept for the caller."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            inner(grid=StopGrid(grid, stop), context=context)
        except Interrupted:
            log.info("server stopped on request; Flower shuts the simulation down")
        except Exception as err:
            outcome.error = err  # Flower may drop it (another error masks it); we do not
            raise
        finally:
            outcome.processes = child_processes(outcome.started)  # before Flower stops Ray

    return app


def simulate(run: PreparedRun, recorder: Recorder) -> None:
    """Run the prepared run in Flower's Ray-backed simulation engine, one SuperNode per client.

    Raises `Interrupted` after a clean stop on SIGINT/SIGTERM (when the run handles signals),
    and the ServerApp's own error if it failed.
    """
    import ray

    sim = run.cfg.simulation
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    stop, outcome = active_stop() or StopSignals(), _Outcome()
    inner = make_server_app(run, [recorder.on_replies], recorder.on_server_metrics,
                            recorder.out_dir)
    config = backend_config(sim)
    flower_log = logging.getLogger("flwr")  # quiet_flower restores its level
    stop.on_signal.append(lambda: flower_log.setLevel(logging.CRITICAL))  # lost client tasks
    try:
        with quiet_flower(bool(sim.verbose)), stop.deferred():
            from flwr.simulation import run_simulation  # its import logs through alembic

            from fedkd.client.app import app as client_app
            from fedkd.simulations.faults import fault_plan, with_faults

            client_app = with_faults(client_app, fault_plan(run.cfg))  # conf/faults (none: as is)

            init_ray(config["init_args"])
            if stop.installed:
                stop.install()  # over the SIGTERM handler ray.init installed
            stop.check()
            try:
                run_simulation(
                    server_app=guarded_app(inner, stop, outcome),
                    client_app=client_app,
                    num_supernodes=int(run.cfg.num_clients),
                    backend_config=config,
                    verbose_logging=bool(sim.verbose),
                )
            except Exception as err:
                if outcome.error is not None and outcome.error is not err:
                    raise outcome.error from err  # the ServerApp's error, not Flower's wrapper
                raise
            if outcome.error is not None:  # swallowed by Flower
                raise outcome.error
    finally:
        leftovers = outcome.processes + child_processes(outcome.started)
        ray.shutdown()
        reap(leftovers)
    stop.check()


def child_processes(since: float = 0.0) -> list[Any]:
    """Descendants of this process started after `since` (psutil ships with Ray)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.create_time() >= since - 1.0:  # create_time has a coarse clock
                found.append(proc)
        except psutil.Error:
            pass
    return found


def reap(processes: list[Any], timeout: float = REAP_TIMEOUT_S) -> None:
    """Kill what is left of `processes` once Ray is shut down; wait up to `timeout` s.

    ``ray.shutdown()`` stops the raylet and GCS but leaves idle ClientAppActor workers to
    notice on their own, sometimes never (an orphan of init).
    """
    left = kill_and_wait(running(processes), timeout, poll=0.05)
    if left:
        log.warning("processes still running after ray.shutdown(): %s", [p.pid for p in left])
