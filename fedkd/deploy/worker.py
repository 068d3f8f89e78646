"""A persistent ClientApp worker: Flower's ClientApp runtime, one process for many messages.

Flower runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process, which
spends ~3 s of CPU importing Flower and torch before the handler starts (2-core machine). With
several SuperNodes on one machine that start-up cost, paid by every node every round, is most of
a round. `WorkerExecutor` replaces the process launcher of Flower's SuperExec: it keeps one worker
process alive that has imported Flower's runtime and torch once, and serves each task token the
SuperExec acquires exactly as ``flwr-clientapp --token`` would (pull the message and Context
from the SuperNode, install the FAB, load the ClientApp from it, push the reply, the Context and
the task status). Context.state still makes the round trip through the SuperNode every message,
as in Flower's simulation engine, whose Ray actors also serve many messages per process.

The ClientApp's modules are loaded from the FAB the server shipped (modules of the same name
imported from elsewhere are dropped first) and reloaded when a run brings another FAB. If the
worker dies, the next task starts a fresh one.

Entry points (started by `fedkd.deploy.supernode`)::

    python -m fedkd.deploy.worker superexec --runtime-api-address 127.0.0.1:9094
    python -m fedkd.deploy.worker serve      # the worker; reads one JSON task per line
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRELOAD = ("numpy", "torch", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")
"""What the worker imports once, before its first task."""


class WorkerExecutor:
    """A Flower SuperExec executor that hands ClientApp tasks to one persistent worker.

    Other task types (none reach a SuperNode's SuperExec) go to Flower's subprocess executor.
    """

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self._worker = self._spawn()

    @staticmethod
    def _spawn() -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "fedkd.deploy.worker", "serve", "--parent-pid",
               str(os.getpid())]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE)  # noqa: S603 (fixed arguments)

    def get_eligible_capacity(self, supported_task_types: set, **_: Any) -> tuple[set, set]:
        """Every task type can be launched now (tasks queue in the worker's stdin)."""
        return supported_task_types, set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        """No capacity gate."""

    def launch(self, spec: Any) -> Any:
        """Hand a ClientApp task to the worker (restarting it if it died)."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        if self._worker.poll() is not None:
            log.warning("ClientApp worker exited (code %s); starting a new one",
                        self._worker.returncode)
            self._worker = self._spawn()
        task = {k: v for k, v in asdict(spec).items() if k != "task_type"}
        try:
            assert self._worker.stdin is not None
            self._worker.stdin.write((json.dumps(task) + "\n").encode())
            self._worker.stdin.flush()
        except OSError as err:
            self._worker = self._spawn()
            return LaunchResult.failed(f"the ClientApp worker refused the task: {err}")
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Between polls: keep a worker alive (a crash restarts it before the next task)."""
        if self._worker.poll() is not None:
            log.warning("ClientApp worker exited (code %s); restarting it", self._worker.returncode)
            self._worker = self._spawn()

    def close(self) -> None:
        """Stop the worker."""
        if self._worker.poll() is None:
            self._worker.terminate()


@dataclass
class LoadedApp:
    """The ClientApp the worker has loaded, and from which installed FAB."""

    fab_hash: str | None = None
    app_dir: Path | None = None
    app: Any = None

    def get(self, run: Any, fab: Any) -> Any:
        """The run's ClientApp, loaded from its FAB (installed and imported once per FAB)."""
        if fab.hash_str == self.fab_hash:
            return self.app
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if self.app_dir is not None:
            forget_modules_of(self.app_dir)
        install_from_fab(fab.content, skip_prompt=True)
        app_dir = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)).absolute()
        forget_modules_of(app_dir)  # e.g. this worker's own `fedkd`, imported from site-packages
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash, self.app_dir = fab.hash_str, app_dir
        return self.app


def forget_modules_of(app_dir: Path) -> None:
    """Drop from `sys.modules` every module named like a top-level module of `app_dir`."""
    names = {p.name for p in app_dir.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in app_dir.glob("*.py")}
    for name in list(sys.modules):
        if name.split(".", 1)[0] in names:
            del sys.modules[name]
    if str(app_dir) in sys.path:
        sys.path.remove(str(app_dir))


def run_task(task: dict[str, Any], loaded: LoadedApp) -> None:
    """Serve one task token as ``flwr-clientapp --token`` would, without exiting."""
    from flwr.app import Message
    from flwr.app.error import Error
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
        app = loaded.get(run, fab)
        reply = app(message=message, context=context)
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


def serve(parent_pid: int | None) -> None:
    """Import the heavy modules once, then serve task lines from stdin until it closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from fedkd.flower_compat import shorten_pull_backoff

    shorten_pull_backoff()  # the SuperNode announces a message before its objects are stored
    if parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(parent_pid)
    handler = logging.StreamHandler()  # the app's own log lines (e.g. a resume) in the node's log
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger("fedkd").addHandler(handler)
    logging.getLogger("fedkd").setLevel(logging.INFO)
    loaded = LoadedApp()
    for line in sys.stdin:
        if line.strip():
            run_task(json.loads(line), loaded)


def run_superexec(runtime_api_address: str, root_certificates: str | None,
                  parent_pid: int | None) -> None:
    """Flower's SuperExec loop with `WorkerExecutor` as its executor."""
    from flwr.supercore.superexec import run_superexec as superexec

    superexec.get_executor = lambda *args, **kwargs: WorkerExecutor()
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=root_certificates is None,
        root_certificates_path=root_certificates,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def main(argv: list[str] | None = None) -> None:
    """``superexec`` (the task loop) or ``serve`` (the worker)."""
    parser = argparse.ArgumentParser(prog="python -m fedkd.deploy.worker")
    parser.add_argument("role", choices=["superexec", "serve"])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    parser.add_argument("--root-certificates", default=None,
                        help="CA of the SuperNode's Runtime API (omit: plain HTTP on loopback)")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    if args.role == "serve":
        serve(args.parent_pid)
    else:
        run_superexec(args.runtime_api_address, args.root_certificates, args.parent_pid)


if __name__ == "__main__":
    main()
