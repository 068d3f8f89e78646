"""Is the simulation engine alive? `EngineWatch` watches Ray's core processes of a run.

`fedkd.simulations.launch` starts the engine; this module only notices its end: Ray's GCS server
or raylet of this run ending, or (declared by `launch.simulate`) Flower's engine returning or
raising while the ServerApp still waits for replies. The Grid (`StopGrid`) then raises
`EngineDied`, or `Interrupted` once a stop was asked for.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedkd.simulations.run import Interrupted, StopSignals, running

log = logging.getLogger("fedkd.simulations.launch")

ENGINE_PROCESSES = ("gcs_server", "raylet")  # Ray's core processes: the run's engine
AUXILIARY_SCRIPTS = ("ray/_private/log_monitor.py", "ray/autoscaler/_private/monitor.py",
                     "ray/dashboard/dashboard.py")
"""Ray's helper processes on the head node (log forwarding, autoscaler, dashboard head): nothing
of a simulation needs them once its ServerApp has returned."""
WATCH_INTERVAL_S = 0.5  # how often `EngineWatch` looks at them


class EngineDied(RuntimeError):
    """The simulation engine (Ray, or Flower's engine loop) died under a running ServerApp."""


class EngineWatch:
    """Declares the simulation engine dead, once, with its message.

    A daemon thread watches `processes` (psutil: Ray's GCS server and raylet of this run) every
    `interval` seconds; `declare` is also called by `simulate` when Flower's engine returns or
    raises while the ServerApp runs. The Grid (`StopGrid`) raises `EngineDied` once `dead` is set.

    Parameters
    ----------
    processes : list
        psutil processes whose end means the engine's end.
    interval : float
        Seconds between two looks.
    stopping : threading.Event, optional
        Set when a stop was asked for (a Ctrl-C reaches Ray's processes too): no death then.
    """

    def __init__(self, processes: list[Any], interval: float = WATCH_INTERVAL_S,
                 stopping: threading.Event | None = None) -> None:
        self.processes, self.interval = processes, interval
        self.stopping = stopping or threading.Event()
        self.names = {proc.pid: proc_name(proc) for proc in processes}  # unreadable once ended
        self.dead = threading.Event()
        self.reason: str | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def declare(self, reason: str) -> None:
        """The engine is dead because of `reason` (the first reason given wins)."""
        if not self.dead.is_set():
            self.reason = reason
            self.dead.set()
            log.error("the simulation engine died: %s", reason)

    def ended(self) -> str | None:
        """Why the engine is dead, if one of its processes has ended; else None."""
        alive = {proc.pid for proc in running(self.processes)}
        for proc in self.processes:
            if proc.pid not in alive:
                return f"Ray's {self.names[proc.pid]} (pid {proc.pid}) ended"
        return None

    def start(self) -> EngineWatch:
        """Start watching (nothing to watch: no thread)."""
        if self.processes:
            self._thread = threading.Thread(target=self._watch, name="fedkd-engine-watch",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop watching (Ray is about to be shut down on purpose)."""
        self._closed.set()

    def _watch(self) -> None:
        import ray

        while not self._closed.wait(self.interval):
            reason = self.ended()
            if reason is not None:
                # ray.shutdown() disconnects before it ends the processes: a shutdown on
                # purpose (Flower's engine ending, with its own error) is no death to declare
                if not (self._closed.is_set() or self.stopping.is_set()) and ray.is_initialized():
                    self.declare(reason)
                return


class StopGrid(Grid):
    """Grid that raises `Interrupted` at its next call once `stop` is asked to stop, and
    `EngineDied` once `watch` declares the engine dead."""

    def __init__(self, grid: Grid, stop: StopSignals, watch: EngineWatch | None = None) -> None:
        self._grid, self._stop, self._watch = grid, stop, watch

    def _check(self) -> None:
        if self._stop.event.is_set():
            raise Interrupted(self._stop.signum or signal.SIGINT)
        if self._watch is not None and self._watch.dead.is_set():
            raise EngineDied(self._watch.reason)

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


def proc_name(proc: Any) -> str:
    """A psutil process's name, or ``process`` once it cannot be read."""
    import psutil

    try:
        return proc.name()
    except psutil.Error:
        return "process"


def engine_processes(since: float) -> list[Any]:
    """Ray's core processes (`ENGINE_PROCESSES`) among this process's children since `since`."""
    return [proc for proc in child_processes(since)
            if any(proc_name(proc).startswith(name) for name in ENGINE_PROCESSES)]


def stop_auxiliary(processes: Iterable[Any]) -> list[Any]:
    """SIGKILL those of `processes` (psutil) that are Ray's helpers (`AUXILIARY_SCRIPTS`), all
    at once, and return them without waiting.

    ``ray.shutdown()`` stops Ray's processes one after the other, each given up to 1 s: about
    0.2 s each for the five it started. Stopped here when the ServerApp returns, the helpers
    exit while Flower winds its workers down, and the shutdown finds them gone."""
    import psutil

    stopped = []
    for proc in processes:
        try:
            command = " ".join(proc.cmdline())
            if any(script in command for script in AUXILIARY_SCRIPTS):
                proc.kill()  # SIGTERM would make the autoscaler report its own failure
                stopped.append(proc)
        except psutil.Error:
            pass
    return stopped


def engine_message(err: BaseException) -> str:
    """The root of Flower's wrapped engine error: ``Type: message`` of the innermost cause."""
    seen: set[int] = set()
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return f"{type(err).__name__}: {err}".strip()


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
