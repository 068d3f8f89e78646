"""`run(cfg)`: one experiment from a composed config, as a plain function.

SIGINT and SIGTERM stop a run cleanly (`StopSignals`): the results so far stay on disk, the
summary says ``status: interrupted`` and `Interrupted` carries the exit code (128 + signal).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedkd.checks import build
from fedkd.server import PreparedRun, prepare_run
from fedkd.simulations.results import Recorder
from fedkd.simulations.resume import resume_folder

Runner = Callable[[PreparedRun, Recorder], None]
"""Drives a prepared run. A runner may carry ``check_config(cfg)`` (on the function a Hydra
partial wraps): `run` calls it before the data is prepared, with the config's own checks
(`fedkd.checks.check_run`, which `prepare_run` calls first), so that its settings (the simulation engine's resources) are
refused before anything starts."""

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: StopSignals | None = None


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's exit status for this signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


class StopSignals:
    """SIGINT/SIGTERM handlers for the duration of a run, restored afterwards (main thread only).

    A first signal raises `Interrupted` in the main thread, except inside `deferred()` (while
    Flower's threads and Ray's processes run): there it only sets `event`, which the simulation
    polls to wind down and shut Ray down. With `force_after` (the CLI), a clean stop that hangs
    longer, or a second signal, ends the process: `on_force` callbacks (the summary), kill the
    child processes, ``os._exit``.

    Parameters
    ----------
    force_after : float or None
        Seconds a deferred stop may take before the process is ended; None: never force.
    """

    def __init__(self, force_after: float | None = None) -> None:
        self.force_after = force_after
        self.event = threading.Event()
        self.signum: int | None = None
        self.on_signal: list[Callable[[], None]] = []  # inside `deferred()`, at the first signal
        self.on_force: list[Callable[[], None]] = []
        self.done = False  # the summary is written: a forced exit needs not write it again
        self._deferred = 0
        self._previous: dict[int, Any] = {}
        self._lock = threading.Lock()  # a forced exit waits for a summary being written
        self._timer: threading.Timer | None = None

    @property
    def installed(self) -> bool:
        """Whether the handlers are in place."""
        return bool(self._previous)

    def install(self) -> None:
        """Install the handlers, or put them back after ``ray.init`` installed its own."""
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        """Put back the handlers found by the first `install`; stop the watchdog."""
        if self._timer is not None:
            self._timer.cancel()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[StopSignals]:
        """While inside, a signal only sets `event` (and arms the watchdog)."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    def check(self) -> None:
        """Raise `Interrupted` if a stop was asked for."""
        if self.event.is_set():
            raise Interrupted(self.signum or signal.SIGINT)

    @contextmanager
    def finishing(self) -> Iterator[None]:
        """Hold off a forced exit while the summary is written."""
        with self._lock:
            yield
            self.done = True

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.event.is_set():
            if self.force_after is None:
                raise Interrupted(self.signum or signum)
            log.warning("%s again: stopping now", name)
            self.force()
        self.signum = signum
        self.event.set()
        if not self._deferred:
            raise Interrupted(signum)
        log.warning("%s received: stopping the simulation (%s again to stop at once)", name, name)
        for action in self.on_signal:
            try:
                action()
            except Exception:  # noqa: BLE001 - never raise in the main thread from here
                log.exception("while stopping")
        if self.force_after is not None:
            self._timer = threading.Timer(self.force_after, self._overdue)
            self._timer.daemon = True
            self._timer.start()

    def _overdue(self) -> None:
        log.error("the clean stop took over %.0f s", self.force_after)
        self.force()

    def force(self) -> None:
        """End the process now: last words (`on_force`), kill child processes, ``os._exit``."""
        got = self._lock.acquire(timeout=1.0)  # never waits on itself for long
        try:
            log.error("ending the process now (killing its child processes)")
            if got and not self.done:
                for action in self.on_force:
                    try:
                        action()
                    except Exception:  # noqa: BLE001 - the exit must happen
                        log.exception("while ending the process")
            kill_children()
        finally:
            logging.shutdown()
            os._exit(128 + (self.signum or signal.SIGINT))


def active_stop() -> StopSignals | None:
    """The `StopSignals` of the run in progress, if it handles signals."""
    return _active


def kill_children(timeout: float = 1.0) -> None:
    """SIGKILL every descendant of this process (Ray's raylet, GCS, agents, workers)."""
    try:
        import psutil
    except ImportError:  # psutil ships with Ray (ray/thirdparty_files)
        return
    kill_and_wait(psutil.Process().children(recursive=True), timeout)


def kill_and_wait(processes: list[Any], timeout: float, poll: float = 0.02) -> list[Any]:
    """SIGKILL `processes` (psutil) and wait up to `timeout` s; return those still running."""
    import psutil

    for proc in processes:
        try:
            log.debug("killing process %s (%s)", proc.pid, proc.name())
            proc.kill()
        except psutil.Error:
            pass
    end = time.monotonic() + timeout
    while processes and time.monotonic() < end:
        time.sleep(poll)
        processes = running(processes)
    return processes


def running(processes: list[Any]) -> list[Any]:
    """Those of `processes` (psutil) still running; a zombie is not."""
    import psutil

    left = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.Error:
            pass
    return left


def describe_error(err: BaseException) -> str:
    """``Type: message``, followed by the causes Flower wraps it in front of."""
    parts, seen, current = [], set(), err
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}".strip())
        current = current.__cause__
    return " <- caused by ".join(parts)


def run(cfg: DictConfig, out_dir: str | Path, runner: Runner | None = None, *,
        stop: StopSignals | None = None) -> dict[str, Any]:
    """Prepare the data, run the configured strategy, write the results to `out_dir`.

    `runner` defaults to the config's `strategy.runner` (the simulation engine, or the pooled
    baseline); `flwr run .` passes one that drives the Grid it was given. Returns the summary
    (also written to ``summary.json``), whose ``status`` is ``ok`` or ``degraded`` (with
    ``status_reasons``: `fedkd.simulations.status`). Results written before a failure stay on
    disk, and the summary says ``status: failed`` with the error; a run that finished without a
    valid result (no accuracy, accuracy at chance with no soft targets) is ``failed`` too, and
    raises RuntimeError like one that crashed. With the default runner in the main thread
    (or a `stop` given), SIGINT/SIGTERM raise `Interrupted` after the summary says
    ``status: interrupted``.
    """
    global _active
    resumed = resume_folder(cfg)  # resume=<run folder>: checked; the run goes on writing there
    out_dir = Path(out_dir) if resumed is None else resumed
    out_dir.mkdir(parents=True, exist_ok=True)
    if stop is None and runner is None and threading.current_thread() is threading.main_thread():
        stop = StopSignals()
    if stop is not None and not stop.installed:
        stop.install()
    _active, recorder = stop, None
    try:
        if resumed is None:  # a resumed run's config is the run's (resume= aside)
            (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        runner = runner or build(cfg.strategy.runner, "strategy.runner")
        check_runner = getattr(getattr(runner, "func", runner), "check_config", None)
        if check_runner is not None:  # the engine's settings, before anything starts
            check_runner(cfg)
        prepared = prepare_run(cfg)  # checks every value first (fedkd.checks.check_run)
        recorder = Recorder.for_run(prepared, out_dir)
        summary = _run_recorded(recorder, prepared, runner, stop)
        if cfg.get("audit", False):  # membership inference; its failure keeps the results
            from fedkd.simulations.audit import audit_after_run

            summary = audit_after_run(out_dir, summary)
    except Interrupted as stopped:
        if recorder is None:  # stopped while preparing: nothing ran
            name = signal.Signals(stopped.signum).name
            summary = {"status": "interrupted", "error": None, "last_round": 0,
                       "stop_signal": name, "status_reasons": [f"stopped by {name} before round 1"]}
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.warning("stopped by %s after round %s; results so far in %s",
                    signal.Signals(stopped.signum).name,
                    recorder.last_round if recorder else 0, out_dir)
        raise
    finally:
        _active = None
        if stop is not None:
            stop.restore()
    log.info("%s | final accuracy mean %.3f min %.3f max %.3f | up %s B down %s B | %.1f s -> %s",
             summary["status"], summary["final_mean_accuracy"], summary["final_min_accuracy"],
             summary["final_max_accuracy"], f"{summary['bytes_up']:,}",
             f"{summary['bytes_down']:,}", summary["wall_time_s"], out_dir)
    return summary


def _run_recorded(recorder: Recorder, prepared: PreparedRun, runner: Runner,
                  stop: StopSignals | None) -> dict[str, Any]:
    """Call `runner`, then write the summary whatever happened (ok, degraded, failed,
    interrupted); a run whose summary says ``failed`` raises RuntimeError with its reason."""
    status, error, signum = "failed", None, None
    if stop is not None:
        stop.on_force.append(lambda: recorder.finish(
            status="interrupted", stop_signal=stop.signum, quick=True))
    try:
        runner(prepared, recorder)
        if stop is not None:
            stop.check()  # a signal between the last round and here
        status = "ok"  # the recorder's facts may make it degraded or failed
    except Interrupted as stopped:
        status, signum = "interrupted", stopped.signum
        raise
    except BaseException as err:
        if stop is None or not stop.event.is_set():
            error = describe_error(err)
            raise
        log.warning("after the stop: %s", describe_error(err))  # e.g. a node the signal hit
        status, signum = "interrupted", stop.signum
        raise Interrupted(stop.signum or signal.SIGINT) from err
    finally:
        with stop.finishing() if stop is not None else nullcontext():
            summary = recorder.finish(status=status, error=error, stop_signal=signum)
    if summary["status"] == "failed":
        raise RuntimeError(summary["error"])
    return summary
