"""A persistent ClientApp worker: Flower's ClientApp runtime, one process for many messages.

Flower runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process, which
spends ~3 s of CPU importing Flower and torch before the handler starts (2-core machine). With
several SuperNodes on one machine that start-up cost, paid by every node every round, is most of
a round. `Worker` takes the ClientApp tasks of Flower's SuperExec (through
`fedkd.flower_compat.ClientAppExecutor`): it keeps one worker process alive that has imported
Flower's runtime and torch once, and serves each task token the SuperExec acquires exactly as
``flwr-clientapp --token`` would (pull the message and Context from the SuperNode, install the
FAB, load the ClientApp from it, push the reply, the Context and the task status). Every Flower
internal this takes lives in `fedkd.flower_compat` (Flower 1.42 has no persistent ClientApp).
Context.state still makes the round trip through the SuperNode every message, as in Flower's
simulation engine, whose Ray actors also serve many messages per process.

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
from pathlib import Path
from typing import Any

from fedkd import flower_compat

log = logging.getLogger(__name__)

PRELOAD = ("numpy", "torch")
"""What the worker imports once, before its first task (and Flower's ClientApp runtime)."""


class Worker:
    """One persistent worker process; ClientApp tasks queue in its stdin, one JSON line each."""

    def __init__(self) -> None:
        self._worker = self._spawn()

    @staticmethod
    def _spawn() -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "fedkd.deploy.worker", "serve", "--parent-pid",
               str(os.getpid())]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE)  # noqa: S603 (fixed arguments)

    def submit(self, task: dict[str, Any]) -> str | None:
        """Hand a task to the worker (restarting it if it died); why it was refused, or None."""
        if self._worker.poll() is not None:
            log.warning("ClientApp worker exited (code %s); starting a new one",
                        self._worker.returncode)
            self._worker = self._spawn()
        try:
            assert self._worker.stdin is not None
            self._worker.stdin.write((json.dumps(task) + "\n").encode())
            self._worker.stdin.flush()
        except OSError as err:
            self._worker = self._spawn()
            return f"the ClientApp worker refused the task: {err}"
        return None

    def reconcile(self) -> None:
        """Between polls: keep a worker alive (a crash restarts it before the next task)."""
        if self._worker.poll() is not None:
            log.warning("ClientApp worker exited (code %s); restarting it", self._worker.returncode)
            self._worker = self._spawn()

    def close(self) -> None:
        """Stop the worker."""
        if self._worker.poll() is None:
            self._worker.terminate()


def forget_modules_of(app_dir: Path) -> None:
    """Drop from `sys.modules` every module named like a top-level module of `app_dir`."""
    names = {p.name for p in app_dir.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in app_dir.glob("*.py")}
    for name in list(sys.modules):
        if name.split(".", 1)[0] in names:
            del sys.modules[name]
    if str(app_dir) in sys.path:
        sys.path.remove(str(app_dir))


def serve(parent_pid: int | None) -> None:
    """Import the heavy modules once, then serve task lines from stdin until it closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    flower_compat.preload_clientapp_runtime()
    flower_compat.shorten_pull_backoff()  # the SuperNode announces a message before its objects
    if parent_pid is not None:
        flower_compat.watch_parent(parent_pid)
    handler = logging.StreamHandler()  # the app's own log lines (e.g. a resume) in the node's log
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger("fedkd").addHandler(handler)
    logging.getLogger("fedkd").setLevel(logging.INFO)
    apps = flower_compat.ClientAppCache(forget_modules_of)
    for line in sys.stdin:
        if line.strip():
            flower_compat.serve_clientapp_task(json.loads(line), apps)


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
        flower_compat.run_worker_superexec(Worker, args.runtime_api_address,
                                           args.root_certificates, args.parent_pid)


if __name__ == "__main__":
    main()
