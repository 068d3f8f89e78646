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
handlers replace the ones ``ray.init`` installs, and its processes are reaped afterwards; with
``simulation.ray_init.address`` an existing cluster is joined instead
(`fedkd.simulations.ray_cluster`), and the prepared data shipped to its nodes.

An engine that dies ends the run the same way (`EngineWatch`): when Ray's core processes of this
run end, or Flower's engine returns or raises while the ServerApp still waits for replies, the
Grid raises `EngineDied` with the engine's message at its next call (within a poll interval),
instead of the ServerApp waiting out the round timeout for replies that can never come. A
ClientApp worker (Ray actor) whose process dies is replaced
(`fedkd.flower_compat.replace_crashed_actors`): the message it ran fails, the others go on.
Each actor holds ``simulation.pipeline`` messages at once (`pipeline_depth`), so that it starts
the next as soon as one ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fedkd.errors import ConfigError, is_number, require_int, require_keys
from fedkd.faults import FaultPlan
from fedkd.flower_compat import (
    UnsupportedFlowerError, one_pass_dispatch, pipeline_actors, require_supported_flower,
)
from fedkd.server import PreparedRun, make_server_app
from fedkd.simulations.engine import (
    EngineDied, EngineWatch, StopGrid, child_processes, engine_message, engine_processes,
    stop_auxiliary,
)
from fedkd.simulations.audit import final_models_saver
from fedkd.simulations.ray_cluster import (  # init_ray: tests replace it here
    QUIET_ENV, attach, backend_config, check_cluster_config, cluster_address, init_ray,
)
from fedkd.simulations.results import Recorder
from fedkd.simulations.resume import Checkpointing
from fedkd.simulations.run import (
    Interrupted, StopSignals, active_stop, kill_and_wait, running,
)

log = logging.getLogger(__name__)

REAP_TIMEOUT_S = 1.0  # how long killed leftovers may take to vanish after ray.shutdown()
SERVER_GRACE_S = 10.0  # how long the ServerApp may take to notice a dead engine and return


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


CLIENT_RESOURCES = ("num_cpus", "num_gpus")
"""What `simulation.client_resources` may ask of Ray for each client (Flower's backend)."""


def available_cpus() -> int:
    """The CPUs Ray finds on this machine (cgroup limits included)."""
    try:
        from ray._private.utils import get_num_cpus

        return max(1, int(get_num_cpus()))
    except Exception:  # noqa: BLE001 - Ray moved it: count the cores we may run on
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)


def available_gpus() -> int:
    """The GPUs torch sees (Ray finds the same CUDA devices)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_backend(cfg: Any) -> None:
    """The Ray backend's settings (`simulation.client_resources`, `simulation.ray_init`).

    Flower's engine starts ``floor(CPUs / num_cpus)`` client actors, and with ``num_gpus > 0``
    at most ``floor(GPUs / num_gpus)``; with none it stops, and the server would wait out the
    round timeout. So ``num_cpus`` must be in ``(0, CPUs]``, CPUs being ``ray_init.num_cpus`` or
    the CPUs Ray finds here, and ``num_gpus`` in ``[0, GPUs]``, GPUs being
    ``ray_init.num_gpus`` or the CUDA devices torch sees: 0 on a machine without a GPU.
    With ``ray_init.address`` (an existing cluster) the nodes declare their resources:
    `fedkd.simulations.ray_cluster.check_cluster_config` checks what can be checked before
    connecting, and the rest once connected.
    """
    import inspect

    import ray

    sim = cfg.simulation
    resources = OmegaConf.to_container(sim.client_resources, resolve=True) or {}
    init = OmegaConf.to_container(sim.ray_init, resolve=True) or {}
    require_keys("simulation.client_resources", resources, CLIENT_RESOURCES)
    ray_options = set(inspect.signature(ray.init).parameters) - {"runtime_env", "kwargs"}
    require_keys("simulation.ray_init", {k: v for k, v in init.items() if not k.startswith("_")},
                 ray_options, owner="ray.init")
    if cluster_address(init) is not None:
        check_cluster_config(init, resources)
        return
    cpus = require_int("simulation.ray_init.num_cpus", init.get("num_cpus"), 1, null=True)
    gpus = require_int("simulation.ray_init.num_gpus", init.get("num_gpus"), 0, null=True)
    where_cpus = "simulation.ray_init.num_cpus" if cpus else "the CPUs Ray finds here"
    where_gpus = "simulation.ray_init.num_gpus" if gpus is not None else "the GPUs torch sees"
    cpus = cpus or available_cpus()
    gpus = available_gpus() if gpus is None else gpus
    num_cpus = resources.get("num_cpus")
    if not (is_number(num_cpus) and 0 < num_cpus <= cpus):
        raise ConfigError("simulation.client_resources.num_cpus", num_cpus,
                          f"must be a number in (0, {cpus}] ({where_cpus}: {cpus})")
    num_gpus = resources.get("num_gpus", 0.0)
    if not (is_number(num_gpus) and 0 <= num_gpus <= gpus):
        allowed = (f"must be a number in [0, {gpus}] ({where_gpus}: {gpus})" if gpus else
                   f"must be 0: no GPU here ({where_gpus}: 0)")
        raise ConfigError("simulation.client_resources.num_gpus", num_gpus, allowed)


class _Outcome:
    """What the ServerApp thread leaves behind: its error, Ray's processes while they ran, and
    whether it is still running (`server_running`, `server_done`)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.processes: list[Any] = []
        self.started = time.time()  # processes started since are the simulation's
        self.server_running = False
        self.server_done = threading.Event()
        self.shipped: Any = None  # on a cluster: the actor shipping the data, kept while it runs
        self.local_ray = False  # Ray started by this run (not a cluster joined)


def pipeline_depth(cfg: Any, plan: FaultPlan | None) -> int:
    """Messages each ClientApp actor holds at once: ``simulation.pipeline``, but 1 when the run's
    fault `plan` has hanging or dropped-out clients (``faults.hang``, ``faults.dropout``): a
    message queued behind one that sleeps past the round would miss the round with it."""
    depth = int(cfg.simulation.get("pipeline", 1))
    if depth > 1 and plan is not None and (plan.clients.get("hang") or plan.clients.get("dropout")):
        log.info("faults make clients hang or drop out: ClientApp workers take one message at "
                 "a time (simulation.pipeline=%d ignored)", depth)
        return 1
    return depth


def guarded_app(inner: ServerApp, stop: StopSignals, outcome: _Outcome,
                watch: EngineWatch | None = None) -> ServerApp:
    """`inner` on a `StopGrid`: a stop ends it quietly, an error is kept for the caller."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome.server_running = True
        try:
            inner(grid=StopGrid(grid, stop, watch), context=context)
        except Interrupted:
            log.info("server stopped on request; Flower shuts the simulation down")
        except EngineDied as err:  # kept for the caller; Flower winds down what is left
            outcome.error = err
        except Exception as err:
            outcome.error = err  # Flower may drop it (another error masks it); we do not
            raise
        finally:
            if watch is not None:
                watch.close()  # Flower shuts Ray down next, on purpose
            outcome.processes = child_processes(outcome.started)  # before Flower stops Ray
            if outcome.local_ray:  # its helpers are not needed any more
                stop_auxiliary(outcome.processes)
            outcome.server_running = False
            outcome.server_done.set()

    return app


def end_with_engine(outcome: _Outcome, watch: EngineWatch, err: BaseException | None,
                    grace: float = SERVER_GRACE_S) -> bool:
    """Flower's engine returned (or raised `err`): a ServerApp still running learns the engine
    is dead and gets up to `grace` seconds to return. Whether it was still running (then the
    engine died under it, and `err` is the engine's own message)."""
    if not outcome.server_running:
        return False
    watch.declare("the simulation engine stopped" if err is None else engine_message(err))
    if not outcome.server_done.wait(grace):
        log.warning("the ServerApp still runs %.0f s after the engine died", grace)
    return True


def simulate(run: PreparedRun, recorder: Recorder) -> None:
    """Run the prepared run in Flower's Ray-backed simulation engine, one SuperNode per client.

    Raises `Interrupted` after a clean stop on SIGINT/SIGTERM (when the run handles signals),
    and the ServerApp's own error if it failed.
    """
    import ray

    sim = run.cfg.simulation
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    stop, outcome, watch = active_stop() or StopSignals(), _Outcome(), None
    config = backend_config(sim)
    outcome.local_ray = cluster_address(config["init_args"]) is None
    starting = RayStart(config["init_args"])  # Ray's processes start while the app is built
    try:
        checkpoints = Checkpointing(run, recorder)  # simulation.checkpoint_every, resume=
        inner = make_server_app(run, [recorder.on_replies], recorder.on_server_metrics,
                                recorder.out_dir, checkpoints.plan,
                                final_models_saver(recorder.out_dir, run,
                                                   checkpoints.client_states),
                                checkpoints.engine_partitions())
    except BaseException:
        starting.join(raise_error=False)
        ray.shutdown()
        starting.release()
        raise
    flower_log = logging.getLogger("flwr")  # quiet_flower restores its level
    stop.on_signal.append(lambda: flower_log.setLevel(logging.CRITICAL))  # lost client tasks
    try:
        with quiet_flower(bool(sim.verbose)), stop.deferred(), checkpoints:
            from flwr.simulation import run_simulation  # its import logs through alembic

            from fedkd.client.app import app as client_app
            from fedkd.simulations.faults import fault_plan, with_faults

            plan = fault_plan(run.cfg)
            client_app = with_faults(client_app, plan)  # conf/faults (none: as is)

            starting.join()
            outcome.shipped = attach(run, config)  # a cluster: resources checked, data shipped
            try:
                pipeline_actors(pipeline_depth(run.cfg, plan))  # crashed actors replaced, too
            except UnsupportedFlowerError as err:
                log.warning("%s: a crashed ClientApp worker stays in Flower's pool, and each "
                            "takes one message at a time", err)
            if stop.installed:
                stop.install()  # over the SIGTERM handler ray.init installed
            stop.check()
            watch = EngineWatch(engine_processes(outcome.started), stopping=stop.event).start()
            try:
                with dispatch():  # Flower's dispatcher is O(nodes x messages) per sweep
                    run_simulation(
                        server_app=guarded_app(inner, stop, outcome, watch),
                        client_app=client_app,
                        num_supernodes=int(run.cfg.num_clients),
                        backend_config=config,
                        verbose_logging=bool(sim.verbose),
                    )
            except Exception as err:
                if end_with_engine(outcome, watch, err):
                    raise EngineDied(engine_message(err)) from err  # the engine's own words
                if outcome.error is not None and outcome.error is not err:
                    raise outcome.error from err  # the ServerApp's error, not Flower's wrapper
                raise
            if end_with_engine(outcome, watch, None) and outcome.error is None:
                raise EngineDied(watch.reason)
            if outcome.error is not None:  # swallowed by Flower
                raise outcome.error
    finally:
        starting.join(raise_error=False)  # before ray.shutdown, whatever failed first
        if watch is not None:
            watch.close()
        leftovers = outcome.processes + child_processes(outcome.started)
        ray.shutdown()
        starting.release()
        reap(leftovers)
    stop.check()


class RayStart:
    """`init_ray` in a background thread, started at once; `join` waits and re-raises its error.

    Ray's processes (GCS, raylet, the prestarted workers) take seconds to start; the ServerApp
    is built meanwhile. ``ray.init`` off the main thread installs no signal handlers, which fedkd
    replaces anyway (`StopSignals`). The thread lives until `release`: Ray's processes get the
    parent-death signal of the *thread* that started them, so its end would kill them.
    """

    def __init__(self, init_args: dict[str, Any]) -> None:
        self.error: BaseException | None = None
        self._ready, self._released = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._start, args=(init_args,),
                                        name="fedkd-ray-init", daemon=True)
        self._thread.start()

    def _start(self, init_args: dict[str, Any]) -> None:
        try:
            init_ray(init_args)  # looked up here: tests replace `launch.init_ray`
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread by join
            self.error = err
        finally:
            self._ready.set()
        self._released.wait()  # Ray's processes die with this thread

    def join(self, raise_error: bool = True) -> None:
        """Wait for ``ray.init`` to return; raise what it raised (once) when `raise_error`."""
        self._ready.wait()
        error, self.error = self.error, None
        if error is not None and raise_error:
            raise error

    def release(self) -> None:
        """Let the thread end (after ``ray.shutdown()``)."""
        self._released.set()
        self._thread.join()


def dispatch() -> Any:
    """`fedkd.flower_compat.one_pass_dispatch` on the supported Flower; Flower's own (warned)
    on another."""
    try:
        require_supported_flower()
    except UnsupportedFlowerError as err:
        log.warning("%s: Flower's own message dispatcher (slow at thousands of nodes)", err)
        return contextlib.nullcontext()
    return one_pass_dispatch()


simulate.check_config = check_backend  # type: ignore[attr-defined]  # fedkd.simulations.run


def reap(processes: list[Any], timeout: float = REAP_TIMEOUT_S) -> None:
    """Kill what is left of `processes` once Ray is shut down; wait up to `timeout` s.

    ``ray.shutdown()`` stops the raylet and GCS but leaves idle ClientAppActor workers to
    notice on their own, sometimes never (an orphan of init).
    """
    left = kill_and_wait(running(processes), timeout, poll=0.05)
    if left:
        log.warning("processes still running after ray.shutdown(): %s", [p.pid for p in left])
