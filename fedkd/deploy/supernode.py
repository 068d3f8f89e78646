"""``fedkd-supernode``: Flower's SuperNode with short polls and a persistent ClientApp worker.

It takes every ``flower-supernode`` option and runs Flower's own SuperNode in this process, with
changes that cut the fixed cost of a round (see docs/deploy.md for the measurements). They patch
Flower internals, all in `fedkd.flower_compat`, which supports flwr 1.42.x only: on another
version ``fedkd-supernode`` stops with an error naming both (plain ``flower-supernode`` works).

- **waits** (`fedkd.flower_compat`): an idle SuperNode sleeps 3 s between pulls and waits for a
  reply in 0.5 s steps; here both are capped at ``--poll-interval`` seconds (each poll is one
  small HTTP(S) request to the SuperLink). A missing object is retried after 0.05 s, not 1 s.
  ``--heartbeat-interval`` (Flower: 30 s) sets how soon a crash is noticed (two missed ones).
- **checks first**: every flag and the node config (``--node-config``, `fedkd.client.node`) are
  checked before the SuperNode starts; a refusal is one line, ``configuration error: ...``, and
  exit status 2 (a node with a typo, ``data_path``, never shows as online).
- **one worker**: unless ``--cold``, the SuperNode runs with ``--isolation process`` and this
  command starts a SuperExec child whose executor serves every message in one persistent
  ClientApp process (`fedkd.deploy.worker`) instead of a fresh one that first spends ~3 s of CPU
  importing Flower and torch.

Example::

    fedkd-supernode --poll-interval 0.2 --superlink 10.0.0.5:9200 --root-certificates ca.crt \\
        --auth-supernode-private-key node.key --node-config 'partition-id=0 data-path="..."'
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from fedkd.client.node import WHERE, NodeConfig
from fedkd.deploy.args import OneLineParser
from fedkd.errors import ConfigError, require_number
from fedkd.flower_compat import (
    UnsupportedFlowerError, cap_supernode_polls, heartbeat_range, parse_node_config,
    run_flower_supernode, set_heartbeat_interval, shorten_pull_backoff,
)

log = logging.getLogger(__name__)

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
"""Flower's own setting, read by flower-superexec: seconds between task polls (default 1.0)."""
SUPEREXEC_POLL = 0.05
"""SuperExec -> local SuperNode polls are loopback requests: poll them often."""
POLL_RANGE = (0.01, 3.0)
"""``--poll-interval`` seconds accepted: from busy polling to Flower's own 3 s."""


def _runtime_api(flower_args: list[str]) -> tuple[str, str | None]:
    """The SuperNode's Runtime API address and the CA that checks it (None: plain HTTP)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9094)
    parser.add_argument("--ssl-ca-certfile", default=None)
    parser.add_argument("--ssl-certfile", default=None)
    known, _ = parser.parse_known_args(flower_args)
    host = "127.0.0.1" if known.host in ("0.0.0.0", "::") else known.host
    ca = known.ssl_ca_certfile if known.ssl_certfile else None
    return f"{host}:{known.port}", ca


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def check_insecure_is_local(flower_args: list[str]) -> None:
    """Refuse ``--insecure`` towards a SuperLink that is not on this machine (`ConfigError`).

    Without TLS, logits, metrics and the node's identity travel in plain text, and without
    authentication anyone can join: the insecure mode is for loopback tests only.
    """
    if "--insecure" not in flower_args:
        return
    known, _ = _superlink_parser().parse_known_args(flower_args)
    host = known.superlink.rsplit(":", 1)[0] if known.superlink else "127.0.0.1"
    if host not in LOOPBACK:
        raise ConfigError("--superlink", known.superlink,
                          "--insecure towards --superlink on another machine is refused: plain "
                          "HTTP and no authentication are for a SuperLink on this machine "
                          "(127.0.0.1) only; use TLS and node keys (docs/deploy.md)")


def check_flags(args: argparse.Namespace, flower_args: list[str]) -> None:
    """fedkd-supernode's own flags, and the flags it sets for Flower (`ConfigError`)."""
    require_number("--poll-interval", args.poll_interval, *POLL_RANGE)
    if args.heartbeat_interval is not None:
        require_number("--heartbeat-interval", args.heartbeat_interval, *heartbeat_range())
    if "--isolation" in flower_args and not args.cold:
        given = flower_args[flower_args.index("--isolation") + 1:]
        raise ConfigError("--isolation", given[0] if given else None,
                          "is set by fedkd-supernode; pass --cold to use Flower's own")
    check_insecure_is_local(flower_args)


def _superlink_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--superlink", default=None)
    return parser


def check_node_config(flower_args: list[str]) -> NodeConfig | None:
    """The ``--node-config`` of `flower_args`, checked as the ClientApp will check it (None
    without one: Flower's simulation default, or a node that is no fedkd node).

    Raises
    ------
    ConfigError
        ``node-config.<key>=<value>: <what is allowed>``: an unknown key (``data_path``), a
        value of the wrong kind, a file that is not on this node.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--node-config", default=None)
    known, _ = parser.parse_known_args(flower_args)
    if known.node_config is None:
        return None
    try:
        config = parse_node_config(known.node_config)
    except ValueError as err:
        raise ConfigError(WHERE, known.node_config, f"is not in Flower's format: {err}") from None
    return NodeConfig.from_mapping(config)


def start_worker_superexec(flower_args: list[str]) -> subprocess.Popen[bytes]:
    """Start the SuperExec child whose executor is the persistent ClientApp worker."""
    address, ca = _runtime_api(flower_args)
    cmd = [sys.executable, "-m", "fedkd.deploy.worker", "superexec",
           "--runtime-api-address", address, "--parent-pid", str(os.getpid())]
    if ca:
        cmd += ["--root-certificates", ca]
    env = {**os.environ}
    env.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL))
    return subprocess.Popen(cmd, env=env)  # noqa: S603 (our module, fixed arguments)


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperNode with capped polls (and the persistent worker unless --cold)."""
    parser = OneLineParser(
        prog="fedkd-supernode",
        description="flower-supernode with short polls and a persistent ClientApp worker; every "
                    "other option is passed to flower-supernode.",
    )
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="longest sleep between the SuperNode's pulls, seconds (Flower: 3)")
    parser.add_argument("--heartbeat-interval", type=float, default=None,
                        help="seconds between heartbeats, 10..1800 (Flower: 30); the SuperLink "
                             "counts a node offline after two missed ones")
    parser.add_argument("--cold", action="store_true",
                        help="one fresh ClientApp process per message (Flower's default)")
    args, flower_args = parser.parse_known_args(argv)
    try:  # before anything connects: a bad node would show as online and fail every round
        check_flags(args, flower_args)
        check_node_config(flower_args)
        cap_supernode_polls(args.poll_interval)
        shorten_pull_backoff()
        if args.heartbeat_interval is not None:
            set_heartbeat_interval(args.heartbeat_interval)
    except (ConfigError, UnsupportedFlowerError) as err:
        parser.refuse(err)
    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL))
    if not args.cold:
        start_worker_superexec(flower_args)
        flower_args = [*flower_args, "--isolation", "process"]
    run_flower_supernode(flower_args)


if __name__ == "__main__":
    main()
