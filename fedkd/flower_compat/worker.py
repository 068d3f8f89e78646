"""The persistent ClientApp worker's side of Flower's SuperExec (`fedkd.flower_compat`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedkd.flower_compat.gate import _shape_error, require_supported_flower

log = logging.getLogger("fedkd.flower_compat")

TASK_FIELDS = ("runtime_api_address", "token", "insecure", "root_certificates_path")
"""What `serve_clientapp_task` needs of a SuperExec execution spec."""


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
