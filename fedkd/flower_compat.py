"""Every use of Flower's private API in fedkd, in one module gated on the Flower version (1.42.x).

Public Flower API is what Flower documents and exports from ``flwr.app``, ``flwr.serverapp``,
``flwr.serverapp.strategy``, ``flwr.clientapp``, ``flwr.simulation``, and its command-line tools;
the rest (``flwr.supercore``, ``flwr.supernode`` and ``flwr.common`` internals, private attributes,
keyword defaults) may change in any release and is used only here. Every function below first
calls `require_supported_flower`, which raises `UnsupportedFlowerError` (naming the installed and
the supported version) on a Flower other than `SUPPORTED_FLOWER`; plain ``flower-supernode`` and
the public API keep working. Each patch also checks Flower's shape and fails loudly otherwise.

Still private, because Flower 1.42 has no public option for it:

- `cap_supernode_polls`: the SuperNode loop (``flwr.supernode.start_client_internal``) sleeps 3 s
  between idle pulls and 0.5 s between checks for a reply; its ``time`` gets capped sleeps.
- `shorten_pull_backoff`: object pulls (``pull_objects``, ``pull_and_inflate_object_from_tree`` in
  ``flwr.supercore.inflatable.inflatable_utils``) retry a missing object after 1 s (doubling to
  10 s), and a message's objects arrive after its announcement: their keyword default becomes
  0.05 s (Flower's callers all use the default).
- `set_heartbeat_interval`: ``HEARTBEAT_DEFAULT_INTERVAL`` (30 s) in ``flwr.supercore.heartbeat``
  and ``flwr.supernode.fleet_http_connection``, the interval a SuperNode announces and keeps.
- `run_flower_supernode`: ``flower-supernode`` (its console-script entry point) run in this
  process, so that the patches above apply to it.
- `parse_node_config`: ``--node-config`` read as ``flower-supernode`` reads it
  (``flwr.common.config.parse_config_args``), so that ``fedkd-supernode`` checks the node config
  before it starts the SuperNode.
- the persistent ClientApp worker (`fedkd.deploy.worker`): `run_worker_superexec` puts
  `ClientAppExecutor` (Flower's executor interface: ``LaunchResult``, ``TaskType``,
  ``ExecutionSpec``, ``SubprocessExecutor``) in place of ``get_executor`` in Flower's SuperExec
  loop (``flwr.supercore.superexec.run_superexec``); `serve_clientapp_task` does what
  ``flwr-clientapp --token`` does (``RuntimeHttpClient`` with its interceptors, retry and TLS
  helpers, ``HeartbeatSender``, ``pull_task_input``/``push_message``/``push_task_output``,
  ``ErrorCode``/``SubStatus``); `ClientAppCache` (``install_from_fab``, ``get_project_dir``,
  ``get_load_client_app_fn``); `watch_parent` (``start_parent_process_monitor``). Flower 1.42's
  ``flwr-clientapp`` serves one token and exits; its SuperExec executors (``subprocess``,
  ``kubernetes``) start a process per task, and its warm pools serve no ClientApp tasks.

- `one_pass_dispatch`: the simulation's dispatcher (``add_messages_to_queue`` in
  ``flwr.server.superlink.fleet.vce.vce_api``) asks the LinkState for each node's next message
  with a scan of every stored message per node (N x M per 0.1 s sweep); it is replaced by one
  pass per `SWEEP_S` sweep that hands out the same messages in the same order. Within the same
  block the engine's queues (``vce_api.Queue``) are `PromptQueue`: Flower's worker and reply
  threads wait on them 1 s at a time between looks at the stop event, which made every
  simulation's end wait up to 1 s.
- `replace_crashed_actors`: the simulation's Ray actor pool (``BasicActorPool`` in
  ``flwr.simulation.ray_transport.ray_actor``, used by ``RayBackend.process_message``) puts an
  actor whose process died back into the pool, where every later message sent to it fails at
  once (and, failing fast and idle first, it takes most of them): a new actor takes its place.
- `capture_simulation_nodes`: the simulation engine's node stores (``_register_node_info_stores``
  in ``flwr.server.superlink.fleet.vce.vce_api``, ``DeprecatedRunInfoStore.retrieve_context``),
  where every simulated node's ``Context`` lives: a checkpoint reads each client's
  ``Context.state`` there, and a resumed run puts it back (`SimulationNodes`). ``run_simulation``
  takes no initial contexts and exposes none.

Flower's own settings instead of patches: the SuperExec's task polls
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``); the ServerApp waits for replies through the public Grid
(``push_messages``/``pull_messages``, `fedkd.wire`), not ``send_and_receive``'s 3 s sleeps.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any, Protocol

log = logging.getLogger(__name__)

SUPPORTED_FLOWER = "1.42"
"""The Flower minor release whose internals this module patches (any 1.42.x)."""
PULL_BACKOFF = 0.05
"""First retry of a missing object, seconds (Flower: 1)."""
SWEEP_S = 0.02
"""Seconds between two sweeps of the simulation's dispatcher (`one_pass_dispatch`)."""
STOP_POLL_S = 0.05
"""Longest wait of the simulation engine's queue reads (`PromptQueue`)."""
TASK_FIELDS = ("runtime_api_address", "token", "insecure", "root_certificates_path")
"""What `serve_clientapp_task` needs of a SuperExec execution spec."""


class UnsupportedFlowerError(RuntimeError):
    """Flower's internals are requested on a Flower version fedkd does not support."""


def require_supported_flower() -> str:
    """The installed ``flwr.__version__``; raise `UnsupportedFlowerError` unless it is 1.42.x."""
    import flwr

    return _check_version(str(flwr.__version__))


@functools.lru_cache(maxsize=None)
def _check_version(installed: str) -> str:
    if installed.split(".")[:2] != SUPPORTED_FLOWER.split("."):
        raise UnsupportedFlowerError(
            f"fedkd patches Flower internals that it supports on flwr {SUPPORTED_FLOWER}.x only, "
            f"but flwr {installed} is installed: install flwr=={SUPPORTED_FLOWER}.* or run plain "
            "flower-supernode (no fedkd patches, no persistent worker)")
    return installed


def _shape_error(what: str) -> RuntimeError:
    return RuntimeError(f"{what}: fedkd's patches of Flower internals support flwr "
                        f"{SUPPORTED_FLOWER}.x (run plain flower-supernode instead)")


# ---- waits ------------------------------------------------------------------------------------


class CappedSleep:
    """Stands in for the `time` module inside one Flower module: every sleep is capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        """Sleep at most `cap` seconds."""
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_polls(interval: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop (idle pulls, waiting for a reply)."""
    require_supported_flower()
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time and not isinstance(loop.time, CappedSleep):
        raise _shape_error("flwr.supernode.start_client_internal no longer sleeps through `time`")
    loop.time = CappedSleep(interval)


def shorten_pull_backoff(initial: float = PULL_BACKOFF) -> None:
    """Make Flower's object pulls retry a missing object after `initial` seconds first."""
    require_supported_flower()
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    for function in functions:  # check all before patching any
        if "initial_backoff" not in (function.__kwdefaults__ or {}):
            raise _shape_error(f"{function.__qualname__} has no initial_backoff any more")
    for function in functions:
        function.__kwdefaults__["initial_backoff"] = initial


def heartbeat_range() -> tuple[float, float]:
    """The heartbeat intervals a SuperLink accepts, seconds (Flower 1.42: 10..1800)."""
    require_supported_flower()
    from flwr.common import constant

    return constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL


def set_heartbeat_interval(seconds: float) -> None:
    """Make this SuperNode announce and send heartbeats every `seconds` (Flower: 30 s)."""
    require_supported_flower()
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    if not constant.HEARTBEAT_MIN_INTERVAL <= seconds <= constant.HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval must be in [{constant.HEARTBEAT_MIN_INTERVAL}, "
                         f"{constant.HEARTBEAT_MAX_INTERVAL}] s, got {seconds}")
    for module in (heartbeat, fleet_http_connection):  # check both before patching either
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise _shape_error(f"{module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL any more")
    for module in (heartbeat, fleet_http_connection):
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def run_flower_supernode(args: list[str]) -> None:
    """Run ``flower-supernode args`` in this process (where the patches above apply)."""
    require_supported_flower()
    from importlib.metadata import entry_points

    found = list(entry_points(group="console_scripts", name="flower-supernode"))
    if not found:
        raise _shape_error("flwr has no flower-supernode console script")
    main = found[0].load()
    sys.argv = ["flower-supernode", *args]
    main()


def parse_node_config(text: str) -> dict[str, Any]:
    """``--node-config`` (``'k=v k2="s"'`` or a .toml file) as the SuperNode will see it.

    Raises
    ------
    ValueError
        The text is not in Flower's format (Flower raises a click exception; its message is kept).
    """
    require_supported_flower()
    import click
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except (click.ClickException, ValueError, OSError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        raise ValueError(message) from None


# ---- the simulation engine --------------------------------------------------------------------


def replace_crashed_actors() -> None:
    """Make Flower's simulation replace a ClientApp actor whose worker process died.

    ``RayBackend.process_message`` fetches a reply with
    ``BasicActorPool.fetch_result_and_return_actor_to_pool(future)`` and, when that raises, hands
    the future's actor back with ``add_actor_back_to_pool(future)``, dead or alive. On Ray's
    ``RayActorError`` (the actor's process ended: a crash, ``os._exit``, the OOM killer) the
    future's actor becomes a fresh one before that happens, once per dead actor, and so do its
    idle slots (`pipeline_actors`); the message that crashed it still gets its error reply. A
    message that only waited behind it on the same actor (submitted later) runs again on the
    fresh one, once. Idempotent.
    """
    require_supported_flower()
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    fetch = BasicActorPool.fetch_result_and_return_actor_to_pool
    if getattr(fetch, "replaces_crashed_actors", False):
        return
    calls = set(RayBackend.process_message.__code__.co_names)
    assigned = set(BasicActorPool.__init__.__code__.co_names)
    add_back = set(BasicActorPool.add_actor_back_to_pool.__code__.co_names)
    if not ({"fetch_result_and_return_actor_to_pool", "add_actor_back_to_pool"} <= calls
            and {"create_actor_fn", "_future_to_actor"} <= assigned
            and {"_future_to_actor", "pool", "append"} <= add_back):
        raise _shape_error("Flower's RayBackend no longer hands actors back to its "
                           "BasicActorPool by future")

    @functools.wraps(fetch)
    def fetch_or_replace(self: Any, future: Any) -> Any:
        import ray

        actor = self._future_to_actor.get(future)
        try:
            result = fetch(self, future)
        except ray.exceptions.RayActorError as err:
            job = _jobs(self).pop(future, None)
            if actor is None:
                raise
            fresh, waited = _replace_dead(self, actor, err), _waited_behind(self, actor, future)
            self._future_to_actor[future] = fresh  # Flower hands it back after the error
            if waited and job is not None:
                return _run_again(self, future, fresh, job)
            raise
        _settle(self, actor, future)
        return result

    fetch_or_replace.replaces_crashed_actors = True  # type: ignore[attr-defined]
    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_or_replace
    BasicActorPool.add_actor_back_to_pool = _add_back


def pipeline_actors(depth: int) -> None:
    """Let each ClientApp actor of Flower's simulation hold `depth` messages at once.

    Flower's ``BasicActorPool`` hands an actor one message and takes it back with the reply, so
    every actor waits, between two messages, for the driver to fetch the reply and submit the
    next (about 5 ms: 7 % of a 1,000-client MNIST round). Here every actor is in the pool
    `depth` times (slots) and Flower starts one worker thread per slot: the next message
    already waits in the actor's queue (Ray runs an actor's tasks in order) when one ends.
    Nothing changes what a client computes. A crash (`replace_crashed_actors`) runs the
    messages that waited behind the crashing one again; a message that hangs holds up the one
    behind it. ``depth=1`` is Flower's own behaviour.
    """
    require_supported_flower()
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"pipeline depth must be an int >= 1, got {depth!r}")
    replace_crashed_actors()  # crashes of actors with slots are handled there
    if not getattr(BasicActorPool.submit, "pipelined", False):
        submit = set(BasicActorPool.submit.__code__.co_names)
        adds = set(BasicActorPool.add_actors_to_pool.__code__.co_names)
        if not ({"pool", "pop", "_future_to_actor"} <= submit
                and {"create_actor_fn", "pool", "num_actors"} <= adds):
            raise _shape_error("Flower's BasicActorPool no longer keeps idle actors in `pool`")
        BasicActorPool.add_actors_to_pool = _add_slots
        BasicActorPool.submit = _submit
        BasicActorPool.terminate_all_actors = _terminate_each_once
    BasicActorPool.fedkd_depth = depth


def _lines(pool: Any) -> dict[int, list[Any]]:
    """Actor (by id) -> its futures in flight, in the order they were submitted."""
    return pool.__dict__.setdefault("fedkd_lines", {})


def _jobs(pool: Any) -> dict[Any, tuple[Any, tuple]]:
    """Future in flight -> how it was submitted (to run it again after a crash)."""
    return pool.__dict__.setdefault("fedkd_jobs", {})


def _add_slots(self: Any, num_actors: int) -> None:
    """`BasicActorPool.add_actors_to_pool` with `pipeline_actors`' depth: each actor in the pool
    that many times, in turns (the first `num_actors` messages go to different actors)."""
    depth = int(getattr(type(self), "fedkd_depth", 1))
    actors = [self.create_actor_fn() for _ in range(num_actors)]
    self.pool.extend(actors * depth)
    self.num_actors += num_actors * depth  # RayBackend.num_workers: one worker thread per slot


def _submit(self: Any, actor_fn: Any, job: tuple) -> Any:
    """`BasicActorPool.submit`, noting each actor's futures in order, and the job."""
    actor = self.pool.pop()
    future = actor_fn(actor, *job)
    self._future_to_actor[future] = actor
    _lines(self).setdefault(id(actor), []).append(future)
    _jobs(self)[future] = (actor_fn, job)
    return future


_submit.pipelined = True  # type: ignore[attr-defined]


def _settle(pool: Any, actor: Any, future: Any) -> None:
    """`future` is done: off its actor's line, its job forgotten."""
    line = _lines(pool).get(id(actor), [])
    if future in line:
        line.remove(future)
    _jobs(pool).pop(future, None)


def _waited_behind(pool: Any, actor: Any, future: Any) -> bool:
    """Whether `future` was not the first of `actor`'s futures in flight when it died (the
    first one ran; the others waited behind it). Settles `future`."""
    died_with = pool.__dict__.get("fedkd_died_with", {}).get(id(actor), [])
    _settle(pool, actor, future)
    return future in died_with and died_with[0] is not future


def _replace_dead(pool: Any, dead: Any, err: BaseException) -> Any:
    """The fresh actor that replaces `dead` (created at its first failure; its idle slots swapped),
    with the futures that were in flight on it then."""
    import ray

    replaced = pool.__dict__.setdefault("fedkd_replaced", {})
    if id(dead) in replaced:
        return replaced[id(dead)][1]
    fresh = pool.create_actor_fn()
    replaced[id(dead)] = (dead, fresh)  # `dead` is kept: its id stays its own
    pool.__dict__.setdefault("fedkd_died_with", {})[id(dead)] = list(
        _lines(pool).get(id(dead), []))
    pool.pool[:] = [fresh if actor is dead else actor for actor in pool.pool]
    try:
        ray.kill(dead, no_restart=True)  # gone already, or unreachable: make sure
    except Exception:  # noqa: BLE001 - a dead actor may refuse even this
        pass
    log.warning("a ClientApp worker died (%s); a new one takes its place",
                str(err).splitlines()[0] if str(err) else type(err).__name__)
    return fresh


def _run_again(pool: Any, future: Any, fresh: Any, job: tuple) -> Any:
    """Run the job of `future`, which waited behind a crash, on `fresh`; its slot goes back."""
    import ray

    actor_fn, args = job
    again = actor_fn(fresh, *args)
    line = _lines(pool).setdefault(id(fresh), [])
    line.append(again)
    try:
        _, message, context = ray.get(again)
    except ray.exceptions.RayActorError as err:  # it crashed the fresh actor too
        pool._future_to_actor[future] = _replace_dead(pool, fresh, err)
        raise
    finally:
        if again in line:
            line.remove(again)
    pool.add_actor_back_to_pool(future)
    return message, context


def _add_back(self: Any, future: Any) -> None:
    """`BasicActorPool.add_actor_back_to_pool`; an actor replaced meanwhile goes back as its
    replacement."""
    actor = self._future_to_actor.pop(future)
    replaced = self.__dict__.get("fedkd_replaced", {})
    while id(actor) in replaced and replaced[id(actor)][0] is actor:
        actor = replaced[id(actor)][1]
    self.pool.append(actor)


def _terminate_each_once(self: Any) -> None:
    """`BasicActorPool.terminate_all_actors`, once per actor (not once per slot)."""
    seen: set[int] = set()
    for actor in self.pool:
        if id(actor) not in seen:
            seen.add(id(actor))
            actor.terminate.remote()


# ---- the persistent ClientApp worker ---------------------------------------------------------


class TaskHandler(Protocol):
    """fedkd's side of `ClientAppExecutor`: ``submit`` queues one task (`TASK_FIELDS`) and returns
    why it was refused, or None; ``reconcile`` runs between SuperExec polls, ``close`` at exit."""

    def submit(self, task: dict[str, Any]) -> str | None: ...  # noqa: D102

    def reconcile(self) -> None: ...  # noqa: D102

    def close(self) -> None: ...  # noqa: D102


class ClientAppExecutor:
    """Flower's SuperExec executor interface around `handler`: ClientApp tasks go to
    ``handler.submit``, other task types (none reach a SuperNode's SuperExec) to Flower's
    subprocess executor."""

    def __init__(self, handler: TaskHandler) -> None:
        require_supported_flower()
        from dataclasses import fields

        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
        from flwr.supercore.superexec.executor.types import ExecutionSpec

        missing = set(TASK_FIELDS) - {f.name for f in fields(ExecutionSpec)}
        if missing:
            raise _shape_error(f"Flower's ExecutionSpec has no {sorted(missing)} any more")
        self.handler = handler
        self._fallback = SubprocessExecutor()

    def get_eligible_capacity(self, supported_task_types: set, **_: Any) -> tuple[set, set]:
        """Every task type can be launched now (tasks queue in the handler)."""
        return supported_task_types, set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        """No capacity gate."""

    def launch(self, spec: Any) -> Any:
        """Hand a ClientApp task to the handler; Flower's ``LaunchResult``."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        refused = self.handler.submit({name: getattr(spec, name) for name in TASK_FIELDS})
        return LaunchResult.accepted() if refused is None else LaunchResult.failed(refused)

    def reconcile(self) -> None:  # noqa: D102
        self.handler.reconcile()

    def close(self) -> None:  # noqa: D102
        self.handler.close()


def run_worker_superexec(handler: Callable[[], TaskHandler], runtime_api_address: str,
                         root_certificates: str | None, parent_pid: int | None) -> None:
    """Flower's SuperExec loop with a `ClientAppExecutor` around ``handler()`` as its executor."""
    require_supported_flower()
    from flwr.supercore.superexec import run_superexec as superexec

    if not callable(getattr(superexec, "get_executor", None)):
        raise _shape_error("flwr.supercore.superexec.run_superexec has no get_executor any more")
    superexec.get_executor = lambda *args, **kwargs: ClientAppExecutor(handler())
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=root_certificates is None,
        root_certificates_path=root_certificates,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def preload_clientapp_runtime() -> None:
    """Import Flower's ClientApp runtime once, before the first task."""
    require_supported_flower()
    import flwr.clientapp  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401


def watch_parent(parent_pid: int) -> None:
    """Exit this process when `parent_pid` ends (Flower's parent-process monitor)."""
    require_supported_flower()
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(parent_pid)


@dataclass
class ClientAppCache:
    """The ClientApp loaded from the last FAB, installed and imported once per FAB.

    `forget_modules(app_dir)` drops the modules a FAB folder provides from `sys.modules`.
    """

    forget_modules: Callable[[Path], None]
    fab_hash: str | None = None
    app_dir: Path | None = None
    app: Any = None

    def get(self, run: Any, fab: Any) -> Any:
        """The run's ClientApp, loaded from its FAB."""
        if fab.hash_str == self.fab_hash:
            return self.app
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if self.app_dir is not None:
            self.forget_modules(self.app_dir)
        install_from_fab(fab.content, skip_prompt=True)
        app_dir = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)).absolute()
        self.forget_modules(app_dir)  # e.g. the worker's own `fedkd`, imported from site-packages
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash, self.app_dir = fab.hash_str, app_dir
        return self.app


def serve_clientapp_task(task: dict[str, Any], apps: ClientAppCache) -> None:
    """Serve one task token as ``flwr-clientapp --token`` would, without exiting."""
    require_supported_flower()
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output, pull_task_input

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=task["runtime_api_address"],
        insecure=task["insecure"],
        root_certificates=validate_and_resolve_root_certificates(
            task["root_certificates_path"], task["insecure"]),
        interceptors=[RuntimeTracingInterceptor(),
                      RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(task["token"])],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        reply = apps.get(run, fab)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 (reported to the server, as flwr-clientapp does)
        log.error("ClientApp raised an exception", exc_info=ex)
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log.error("failed to push the reply", exc_info=ex)
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()


# ---- the simulation engine's node contexts (checkpoints, resume) ------------------------------


class SimulationNodes:
    """The nodes of the next simulation `run_simulation` starts in this process, and the
    ``Context`` Flower's engine keeps for each (its ``state`` is the client's state).

    Flower 1.42 keeps every simulated node's Context in the engine's node stores (one
    ``DeprecatedRunInfoStore`` per node, made by ``_register_node_info_stores`` in
    ``flwr.server.superlink.fleet.vce.vce_api``) and offers no public way to read or seed them:
    `capture_simulation_nodes` wraps that function while a simulation starts, so the stores it
    makes land here. The engine replaces a node's Context after each message it handles; between
    rounds (no message in flight) they are final and may be read or replaced from the
    ServerApp's thread.
    """

    def __init__(self) -> None:
        import threading

        self._stores: dict[int, Any] = {}
        self._run_id: int | None = None
        self._ready = threading.Event()

    def _capture(self, stores: dict[int, Any], run_id: int) -> None:
        self._stores, self._run_id = stores, run_id
        self._ready.set()

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the engine has registered its nodes (it starts after the ServerApp)."""
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the simulation engine registered no nodes within {timeout:.0f} s")

    def partition_of(self) -> dict[int, int]:
        """Node id -> the partition id in its node config."""
        self.wait()
        return {node: int(store.node_config["partition-id"]) for node, store in self._stores.items()}

    def known(self, timeout: float = 10.0) -> dict[int, int]:
        """`partition_of` once the engine has registered its nodes' stores, else empty.

        Flower's engine registers the nodes in its state first and their stores right after
        (``_register_nodes``, then ``_register_node_info_stores``): a ServerApp that saw the
        nodes may ask between the two, so this waits up to `timeout` s. Without the wait a
        1,000-node run sometimes asked every node ``query.whoami`` first (1,000 messages) because
        it asked a few milliseconds too early."""
        return self.partition_of() if self._ready.wait(timeout) else {}

    def states(self) -> dict[int, Any]:
        """Partition id -> that node's ``Context.state`` (a RecordDict; do not change it)."""
        self.wait()
        return {int(store.node_config["partition-id"]): store.retrieve_context(self._run_id).state
                for store in self._stores.values()}

    def set_states(self, states: dict[int, Any]) -> None:
        """Replace the ``Context.state`` of the node holding each partition of `states` (before
        its first message)."""
        self.wait()
        for store in self._stores.values():
            partition = int(store.node_config["partition-id"])
            if partition in states:
                store.retrieve_context(self._run_id).state = states[partition]


@contextmanager
def capture_simulation_nodes(nodes: SimulationNodes | None = None) -> Iterator[SimulationNodes]:
    """While inside, the next simulation started in this process hands its nodes' stores to
    `nodes` (a new `SimulationNodes` if None), which is yielded."""
    require_supported_flower()
    from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "_register_node_info_stores", None)
    if original is None or not hasattr(DeprecatedRunInfoStore, "retrieve_context"):
        raise RuntimeError(
            "flwr's simulation engine has no _register_node_info_stores (or node stores without "
            f"retrieve_context) any more: fedkd checkpoints simulated clients on flwr "
            f"{SUPPORTED_FLOWER}.x only (set simulation.checkpoint_every=0)")
    nodes = SimulationNodes() if nodes is None else nodes

    @functools.wraps(original)
    def register(nodes_mapping: Any, run: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        stores = original(nodes_mapping, run, *args, **kwargs)
        nodes._capture(stores, run.run_id)
        return stores

    vce_api._register_node_info_stores = register
    try:
        yield nodes
    finally:
        vce_api._register_node_info_stores = original


# --- the simulation's message dispatcher ------------------------------------------------------
VCE_API = "flwr.server.superlink.fleet.vce.vce_api"


def first_undelivered(state: Any, order: dict[int, int]) -> list[Any]:
    """Each node's first undelivered message (store order), in `order`, marked delivered: what
    one sweep of Flower's ``add_messages_to_queue`` hands out, with one check per message."""
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))  # expiry and federation, once per message
        picked: dict[int, Any] = {}
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            node = msg.metadata.dst_node_id
            if node in order and node not in picked:
                picked[node] = msg
    out = sorted(picked.values(), key=lambda m: order[m.metadata.dst_node_id])
    delivered_at = now().isoformat()
    for msg in out:
        msg.metadata.delivered_at = delivered_at
    return out


def _add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int],
                           f_stop: Any) -> None:
    """Drop-in for Flower's ``add_messages_to_queue``: one pass over the store per sweep, every
    `SWEEP_S` (Flower: 0.1 s, which a pushed wave waited half of on average)."""
    order = {node: i for i, node in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        for msg in first_undelivered(state, order):
            queue.put(msg)
        f_stop.wait(SWEEP_S)


class PromptQueue(Queue):
    """`queue.Queue` whose timed ``get`` waits at most `STOP_POLL_S` at a time.

    Flower's engine threads (``worker``, ``put_message_into_state``) call ``get(timeout=1.0)``
    in a loop that looks at the stop event in between; a shorter wait lets them see it sooner.
    A ``get`` that times out raises ``Empty`` as before: the callers loop."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:  # noqa: D102
        return super().get(block, timeout if timeout is None else min(timeout, STOP_POLL_S))


@contextmanager
def one_pass_dispatch() -> Iterator[None]:
    """While inside, Flower's simulation hands messages to its workers with one pass over the
    stored messages per sweep.

    Flower 1.42's ``add_messages_to_queue`` (``flwr.server.superlink.fleet.vce.vce_api``) asks
    the in-memory LinkState, every 0.1 s, for each of the N nodes in turn for one undelivered
    message, and each ask scans the stored messages from the start (``get_message_ins``): N x M
    checks per sweep with the state lock held. At 1,000 nodes and 100 messages a 5-round run
    took 6.3x the plain loop's time; with one pass, 1.27x (docs/results/scale). Flower offers no
    option for it."""
    require_supported_flower()
    import importlib

    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    vce_api = importlib.import_module(VCE_API)
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or not hasattr(InMemoryLinkState, "_check_stored_messages"):
        raise _shape_error(f"{VCE_API}.add_messages_to_queue or "
                           "InMemoryLinkState._check_stored_messages")
    if getattr(vce_api, "Queue", None) not in (Queue, PromptQueue):
        raise _shape_error(f"{VCE_API} no longer makes its queues with queue.Queue")
    queue_class = vce_api.Queue
    vce_api.add_messages_to_queue, vce_api.Queue = _add_messages_to_queue, PromptQueue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue, vce_api.Queue = original, queue_class
