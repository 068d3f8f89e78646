"""A real federation on 127.0.0.1: one SuperLink, N SuperNodes with their own data files.

`LocalFederation` writes each node's data file from a partition of a data set
(`fedkd.deploy.files`), optionally certificates and node keys (`fedkd.deploy.security`), starts
``flower-superlink`` and N ``fedkd-supernode`` processes (each with its own node config, Flower
home, cache and checkpoint folder, as on separate devices) and runs ``flwr run`` against them.
Every process is stopped on exit (process groups, SIGTERM then SIGKILL). The ``fedkd-federation``
command (`fedkd.deploy.cli`) drives it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkd.deploy.files import FederationFiles, export_node_files
from fedkd.errors import ConfigError, require_choice, require_int, require_number
from fedkd.deploy.processes import Process, free_port, wait_for_port
from fedkd.deploy.supernode import POLL_RANGE
from fedkd.deploy.security import Certificates, make_certificates, make_node_key, register_node
from fedkd.simulations.flwr_app import write_app

log = logging.getLogger(__name__)

CONNECTION = "fedkd-local"
LAUNCHERS = ("worker", "cold", "flower")
HOST = "127.0.0.1"  # the insecure mode never leaves loopback


@dataclass
class Options:
    """What to run: data, strategy, security and speed knobs of a local federation."""

    num_nodes: int = 3
    rounds: int = 3
    strategy: str = "fedmd"
    model: str = "hetero"
    """The server's ``model=`` config group: the names `archs` may use (``hetero``: cnn_small,
    mlp and cnn_teacher; the simulation's default ``auto`` offers cnn_small and cnn_deep on
    images)."""
    archs: tuple[str, ...] = ("cnn_small", "mlp", "cnn_teacher")
    """Node i runs archs[i % len(archs)] (node config ``arch``); empty: the server's assignment."""
    secure: bool = False
    """TLS (a private CA and SuperLink certificate) plus SuperNode authentication (registered
    ECDSA P-384 keys), all made by `fedkd.deploy.security`."""
    public: str = "file"
    """``file``: nodes and server read public.npz; ``embedded``: everybody rebuilds digits'."""
    dataset: str = "digits"
    poll_interval: float = 0.1
    heartbeat_interval: float = 10.0
    """SuperNode heartbeats (fedkd-supernode); a crash is noticed after two missed ones."""
    launcher: str = "worker"
    """``worker``: fedkd-supernode with its persistent ClientApp worker; ``cold``: fedkd-supernode
    with Flower's one fresh ClientApp process per message; ``flower``: Flower's own
    flower-supernode as shipped (3 s idle polls, 1 s pull backoff, a process per message)."""
    round_timeout: float = 120.0
    overrides: tuple[str, ...] = ()
    """Extra Hydra overrides for the server (e.g. ``distill.warmup_epochs=5``)."""

    def server_overrides(self, public: str, num_classes: int | None = None) -> list[str]:
        """The run's Hydra overrides: the nodes' data (`public`: a file or an embedded name),
        this federation's size, the options."""
        classes = [] if num_classes is None else [f"dataset.num_classes={num_classes}"]
        return ["dataset=nodes", f"dataset.public={public}", *classes,
                f"num_clients={self.num_nodes}", f"num_rounds={self.rounds}",
                f"strategy={self.strategy}", f"model={self.model}",
                f"simulation.round_timeout={self.round_timeout}", *self.overrides]

    def check(self) -> None:
        """Every option, and the server config they make (`fedkd.checks.check_run`), before any
        process starts. Refusals name the ``fedkd-federation run`` flag (``--rounds=0: ...``);
        the server's own values are named by their config key.

        Raises
        ------
        ConfigError
            The first value refused.
        """
        from fedkd.checks import check_run
        from fedkd.server import CONF_DIR, compose_config

        require_int("--nodes", self.num_nodes, 1)
        require_int("--rounds", self.rounds, 1)
        options = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")
                                 if not p.stem.startswith("_")) for group in ("strategy", "model")}
        require_choice("--model", self.model, options["model"])
        require_choice("--launcher", self.launcher, LAUNCHERS)
        require_choice("--public", self.public, ("file", "embedded"))
        require_number("--poll-interval", self.poll_interval, *POLL_RANGE)
        require_number("--round-timeout", self.round_timeout, 0.0, low_open=True)
        require_choice("--strategy", self.strategy, options["strategy"])
        try:
            cfg = compose_config(self.server_overrides(public=self.dataset))
        except Exception as err:  # noqa: BLE001 - Hydra's refusal of an override, in one line
            raise ConfigError(f"the server's overrides {list(self.overrides)}: "
                              f"{str(err).strip().splitlines()[0]}") from None
        if cfg.strategy.get("flower") is None:
            raise ConfigError("--strategy", self.strategy, "runs no Flower strategy; one of "
                              f"{[s for s in options['strategy'] if s != self.strategy]}")
        catalog = sorted(cfg.model.archs)
        for arch in self.archs:
            require_choice("--archs", arch, catalog)
        check_run(cfg)


@dataclass
class RunResult:
    """What one ``flwr run`` left behind."""

    returncode: int
    out_dir: Path | None
    log_path: Path
    seconds: float

    @property
    def summary(self) -> dict[str, Any]:
        """The run's summary.json."""
        if self.out_dir is None:
            raise RuntimeError(f"the run wrote no results; see {self.log_path}")
        return json.loads((self.out_dir / "summary.json").read_text())


@dataclass
class LocalFederation:
    """SuperLink + SuperNodes on loopback; use as a context manager."""

    workdir: Path
    options: Options = field(default_factory=Options)
    superlink: Process | None = None
    nodes: dict[int, Process] = field(default_factory=dict)
    """The current process of each node (a restart replaces it)."""
    started: list[Process] = field(default_factory=list)
    """Every process started, all stopped on exit."""
    files: FederationFiles | None = None
    certs: Certificates | None = None
    port: int = 0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.results = self.workdir / "results"

    # --- set-up ----------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        try:
            self.prepare()
            self.start_superlink()
            for i in range(self.options.num_nodes):
                self.start_node(i)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, home: Path | None = None, cache: Path | None = None) -> dict[str, str]:
        """Environment of a federation process: quiet Flower, no `uv sync`, its own homes."""
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FLWR_HOME": str(home or self.flwr_home),
               "FEDKD_CACHE_DIR": str(cache or self.workdir / "server-cache"),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("FLWR_LOG_LEVEL", None)
        if self.options.launcher != "flower":  # SuperExec task polls: Flower's default is 1 s
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.05"
        return env

    def prepare(self) -> None:
        """Data files, certificates and keys, and the CLI's connection to the SuperLink."""
        from fedkd.server import compose_config

        opts = self.options
        cfg = compose_config([f"dataset={opts.dataset}", f"num_clients={opts.num_nodes}"])
        self.files = export_node_files(cfg, self.workdir / "data")
        self.port = free_port()
        if opts.secure:
            self.certs = make_certificates(self.workdir / "certs", [HOST, "localhost"])
            for i in range(opts.num_nodes):
                make_node_key(self.workdir / "keys", f"node-{i}")
        tls = (f'root-certificates = "{self.certs.ca_cert}"' if self.certs else "insecure = true")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\n{tls}\n')

    def start_superlink(self) -> None:
        """Start the SuperLink; under `secure`, with TLS and node auth, and register the keys."""
        cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--host", HOST,
               "--port", str(self.port), "--disable-runtime-dependency-installation"]
        cmd += ([*self.certs.superlink_args(), "--enable-supernode-auth"] if self.certs
                else ["--insecure"])
        self.superlink = Process("superlink", cmd, self.workdir / "logs" / "superlink.log",
                                 self.env()).start()
        wait_for_port(self.port, self.superlink)
        if self.certs:
            for i in range(self.options.num_nodes):
                register_node(self.workdir / "keys" / f"node-{i}.pub", CONNECTION, self.env())

    def node_config(self, i: int) -> str:
        """Node i's ``--node-config``: its files, its architecture, its checkpoint folder."""
        assert self.files is not None
        archs = self.options.archs
        extra: dict[str, str] = {"checkpoint-dir": str(self.workdir / f"node-{i}" / "checkpoints")}
        if archs:
            extra["arch"] = archs[i % len(archs)]
        config = self.files.node_config(i, **extra)
        if self.options.public == "embedded":
            config = config.replace(f'public-path="{self.files.public}"',
                                    f'public="{self.options.dataset}"')
        return config

    def node_command(self, i: int, key: Path | None = None) -> list[str]:
        """The SuperNode command line of node i (`key`: its private auth key)."""
        launcher = self.options.launcher
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher={launcher!r} is unknown; allowed: {LAUNCHERS}")
        if launcher == "flower":
            cmd = [str(Path(sys.executable).parent / "flower-supernode")]
        else:
            cmd = [sys.executable, "-m", "fedkd.deploy.supernode",
                   "--poll-interval", str(self.options.poll_interval),
                   "--heartbeat-interval", str(self.options.heartbeat_interval)]
            cmd += ["--cold"] if launcher == "cold" else []
        cmd += ["--superlink", f"{HOST}:{self.port}", "--port", str(free_port()),
                "--node-config", self.node_config(i)]
        if self.certs:
            cmd += ["--root-certificates", str(self.certs.ca_cert)]
            key = key or self.workdir / "keys" / f"node-{i}"
            cmd += ["--auth-supernode-private-key", str(key)]
        else:
            cmd.append("--insecure")
        return cmd

    def start_node(self, i: int, key: Path | None = None, name: str | None = None) -> Process:
        """Start (or restart) SuperNode i with its own Flower home and cache, as on a device.

        With `name`, the process is an extra one (e.g. a node with an unregistered `key`) and
        does not replace node i.
        """
        home = self.workdir / f"node-{i}"
        label = name or f"node-{i}" + (f"-restart{len(self.started)}" if i in self.nodes else "")
        proc = Process(label, self.node_command(i, key), self.workdir / "logs" / f"{label}.log",
                       self.env(home / "flwr-home", home / "cache")).start()
        self.started.append(proc)
        if name is None:
            self.nodes[i] = proc
        return proc

    def restart_node(self, i: int, timeout: float = 180.0, retry_every: float = 5.0) -> Process:
        """Start node i again until the SuperLink lets it in, as a service manager would.

        Under authentication the SuperLink refuses a key whose node it still counts as online:
        a crashed node is let back in once two heartbeats are missed (`Options.heartbeat_interval`;
        ~60 s with Flower's default of 30 s).
        """
        end = time.monotonic() + timeout
        while True:
            proc = self.start_node(i)
            if proc.wait_for_log("SuperNode ID:", timeout=60.0):
                return proc
            proc.stop()
            if time.monotonic() >= end:
                raise RuntimeError(f"node {i} was not let back in within {timeout:.0f} s:\n"
                                   f"{proc.tail()}")
            log.info("node %d not let back in yet; retrying in %.0f s", i, retry_every)
            time.sleep(retry_every)

    def kill_node(self, i: int) -> None:
        """SIGKILL node i and everything it started (a crash, not a shutdown)."""
        self.nodes[i].kill()

    # --- running ---------------------------------------------------------------------------
    def server_overrides(self) -> list[str]:
        """The run's Hydra overrides: the nodes' data, this federation's size, the options."""
        assert self.files is not None
        opts = self.options
        public = opts.dataset if opts.public == "embedded" else str(self.files.public)
        return opts.server_overrides(public, self.files.num_classes)

    def run_command(self) -> list[str]:
        """``flwr run`` of the app against this federation, with the run's Hydra overrides."""
        run_config = f'overrides="{" ".join(self.server_overrides())}" output-dir="{self.results}"'
        app = write_app(self.workdir / "app")  # the installed fedkd's app: works from a wheel too
        return [str(Path(sys.executable).parent / "flwr"), "run", str(app), CONNECTION,
                "--stream", "--run-config", run_config]

    def start_run(self) -> Process:
        """Submit the run; its streamed log goes to ``logs/run.log``."""
        self.results.mkdir(parents=True, exist_ok=True)
        self._before = set(self.results.iterdir())
        self._run_started = time.monotonic()
        proc = Process("flwr-run", self.run_command(), self.workdir / "logs" / "run.log",
                       self.env()).start()
        self.started.append(proc)
        return proc

    def finish_run(self, proc: Process, timeout: float) -> RunResult:
        """Wait for a started run; stop it if it outlives `timeout`."""
        assert proc.popen is not None
        try:
            code = proc.popen.wait(timeout=timeout)
        except Exception:
            proc.stop()
            raise TimeoutError(f"the run did not finish in {timeout:.0f} s:\n{proc.tail(40)}")
        proc.stop()
        new = sorted(set(self.results.iterdir()) - self._before)
        out = next((p for p in new if (p / "summary.json").is_file()), None)
        return RunResult(code, out, proc.log_path, time.monotonic() - self._run_started)

    def run(self, timeout: float = 600.0) -> RunResult:
        """Run the app to the end."""
        return self.finish_run(self.start_run(), timeout)

    def wait_for_round(self, proc: Process, server_round: int, timeout: float) -> bool:
        """Wait until the server has recorded the end of `server_round` (its metrics.parquet,
        written before the next round's messages go out; the streamed log lags behind)."""
        import pandas as pd

        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.alive:
            for metrics in set(self.results.glob("*/metrics.parquet")) - {
                    p / "metrics.parquet" for p in self._before}:
                try:
                    if (pd.read_parquet(metrics, columns=["round"])["round"] >= server_round).any():
                        return True
                except (OSError, ValueError):  # being rewritten right now
                    pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop every node, then the SuperLink (and with it any ServerApp)."""
        for proc in self.started:
            proc.stop()
        if self.superlink is not None:
            self.superlink.stop()
