"""Start and stop the processes of a local federation: each in its own process group.

A SuperLink or SuperNode starts children (SuperExec, ClientApp worker, ServerApp); stopping one
means signalling its whole group, then waiting, then killing what is left.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """One started command, its log file and its process group."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> Process:
        """Start the command in a new session (its own process group), output to the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(  # noqa: S603 (commands built by fedkd)
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
        )
        log.info("started %s (pid %d), log %s", self.name, self.popen.pid, self.log_path)
        return self

    @property
    def alive(self) -> bool:
        """Whether the main process still runs."""
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the process group (no-op once it is gone)."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, as far as Flower can tell)."""
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)
        log.info("killed %s", self.name)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, wait up to `grace` seconds, then SIGKILL what is left."""
        if self.popen is not None:
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            self.signal_group(signal.SIGKILL)  # children that outlived their parent, too
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not exit", self.name, self.popen.pid)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        """The whole log so far ("" before the first line)."""
        if not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_contains(self, text: str) -> bool:
        """Whether `text` appears anywhere in the log (a traceback after it does not hide it)."""
        return text in self.log_text()

    def wait_for_log(self, text: str, timeout: float) -> bool:
        """Wait until `text` appears anywhere in the log; False on timeout, or if the process
        ended without writing it (its last words are read after it exits)."""
        end = time.monotonic() + timeout
        while True:
            exited = not self.alive  # before reading: a line written just before exit is seen
            if self.log_contains(text):
                return True
            if exited or time.monotonic() >= end:
                return False
            time.sleep(0.1)

    def wait_for_exit(self, timeout: float) -> int | None:
        """Wait until the main process exits; its exit code, or None if it still runs after
        `timeout` seconds (it is left running: `stop` ends it)."""
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 20) -> str:
        """The last lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def wait_for_port(port: int, proc: Process, timeout: float = 120.0, host: str = "127.0.0.1") -> None:
    """Wait until `host:port` accepts connections; fail early if `proc` died.

    The timeout is generous (a loaded machine can take a minute to import Flower): waiting
    ends as soon as the port opens or the process exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited before listening on {port}:\n{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{proc.name} is not listening on {host}:{port} after {timeout:.0f} s")
