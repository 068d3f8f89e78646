"""``fedkd-federation``: try a deployment on one machine, or prepare one for real devices.

Sub-commands
- ``run``: SuperLink + N SuperNodes on 127.0.0.1, each with its own data file, then ``flwr run``
  (optionally kill and restart one node mid-run); prints accuracies, per-round latency and the
  work folder it keeps (``--clean`` removes it after a successful run).
- ``export``: write one raw data file per device (plus public.npz and test.npz) from a data set.
- ``certs``: a private CA and a SuperLink TLS certificate for the given hosts.
- ``keys``: one ECDSA P-384 key pair per SuperNode (OpenSSH format), to register with the SuperLink.

Every flag, and the server config ``run`` makes of them, is checked before any process starts
(`check_args`); a refusal is one line, ``configuration error: --rounds=0: must be an int >= 1``,
and exit status 2 (`fedkd.deploy.args`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from fedkd.deploy.args import OneLineParser
from fedkd.deploy.federation import LAUNCHERS, LocalFederation, Options, RunResult
from fedkd.deploy.processes import Process
from fedkd.errors import ConfigError, require_int, require_number

log = logging.getLogger("fedkd.deploy")


def options(args: argparse.Namespace) -> Options:
    """The federation ``run`` asks for."""
    return Options(
        num_nodes=args.nodes, rounds=args.rounds, strategy=args.strategy,
        model=args.model, archs=tuple(a for a in args.archs.split(",") if a), secure=args.secure,
        public=args.public, poll_interval=args.poll_interval, launcher=args.launcher,
        round_timeout=args.round_timeout, overrides=tuple(args.overrides),
    )


def check_args(args: argparse.Namespace) -> None:
    """Every flag of the sub-command, before anything starts (`ConfigError` naming the flag).

    ``run``: the federation's options and the server config they make (`Options.check`), the
    wait for the run, and the kill-and-restart drill (``--kill-node`` a node, killed after a
    round that is not the last); ``export``/``keys``: at least one node; ``certs``: days >= 1.
    """
    if args.command in ("export", "keys"):
        require_int("--nodes", args.nodes, 1)
    if args.command == "certs":
        require_int("--days", args.days, 1)
    if args.command != "run":
        return
    options(args).check()
    require_number("--timeout", args.timeout, 0.0, low_open=True)
    if args.clean and args.workdir is not None:
        raise ConfigError("--clean", True, "removes only the temporary work folder it creates; "
                                           "not with --workdir")
    if args.kill_node is None:
        return
    require_int("--kill-node", args.kill_node, 0, args.nodes - 1)
    if args.rounds < 2:
        raise ConfigError("--kill-node", args.kill_node, "needs --rounds >= 2 (the node is "
                                                         "killed after a round, not the last)")
    require_int("--kill-after-round", args.kill_after_round, 1, args.rounds - 1)
    require_number("--kill-delay", args.kill_delay, 0.0)
    require_number("--restart-delay", args.restart_delay, 0.0)


def _run(args: argparse.Namespace) -> int:
    opts = options(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedkd-federation-")).resolve()
    clean = False
    try:
        with LocalFederation(workdir, opts) as fed:
            proc = fed.start_run()
            if args.kill_node is not None:
                _kill_and_restart(fed, proc, args)
            result = fed.finish_run(proc, args.timeout)
        _report(result)
        ok = result.returncode == 0 and result.out_dir is not None
        clean = args.clean and ok  # a failed run keeps its logs
        return 0 if ok else 1
    finally:
        if clean:
            shutil.rmtree(workdir, ignore_errors=True)
            log.info("work folder %s removed (--clean)", workdir)
        else:
            log.info("work folder kept: %s (results/, logs/, data/; --clean removes it)", workdir)


def _kill_and_restart(fed: LocalFederation, proc: Process, args: argparse.Namespace) -> None:
    if not fed.wait_for_round(proc, args.kill_after_round, args.timeout):
        raise RuntimeError(f"round {args.kill_after_round} never ended; see {proc.log_path}")
    time.sleep(args.kill_delay)
    fed.kill_node(args.kill_node)
    log.info("node %d killed after round %d; restarting it in %.1f s", args.kill_node,
             args.kill_after_round, args.restart_delay)
    time.sleep(args.restart_delay)
    if args.restart_fresh:  # the control: what the node would do without its checkpoint
        shutil.rmtree(fed.workdir / f"node-{args.kill_node}" / "checkpoints", ignore_errors=True)
    fed.restart_node(args.kill_node)


def _report(result: RunResult) -> None:
    from fedkd.deploy.latency import write_latency

    if result.out_dir is None:
        log.error("the run failed (exit %d); see %s", result.returncode, result.log_path)
        return
    summary = result.summary
    log.info("results in %s (run wall time %.1f s, flwr run %.1f s)", result.out_dir,
             summary["wall_time_s"], result.seconds)
    log.info("final accuracy by client %s, archs %s", summary["final_accuracy_by_client"],
             summary["archs"])
    table = write_latency(result.out_dir)
    for row in table.itertuples():
        log.info("round %d: latency %.2f s, slowest client computed %.2f s, bound %.2f s -> %s",
                 row.round, row.latency_s, row.slowest_compute_s, row.bound_s,
                 "ok" if row.within else "OVER")


def _export(args: argparse.Namespace) -> int:
    from fedkd.deploy.files import export_node_files
    from fedkd.server import compose_config

    cfg = compose_config([f"num_clients={args.nodes}", *args.overrides])
    files = export_node_files(cfg, args.out)
    for i in range(args.nodes):
        print(f"node {i}: --node-config '{files.node_config(i)}'")  # noqa: T201 (CLI output)
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedkd.deploy.security import make_certificates

    certs = make_certificates(args.out, args.host, days=args.days)
    print(f"SuperLink: {' '.join(certs.superlink_args())}")  # noqa: T201
    print(f"SuperNodes and the flwr CLI: --root-certificates {certs.ca_cert}")  # noqa: T201
    return 0


def _keys(args: argparse.Namespace) -> int:
    from fedkd.deploy.security import make_node_key

    for i in range(args.nodes):
        key, pub = make_node_key(args.out, f"node-{i}")
        print(f"node {i}: --auth-supernode-private-key {key}; register {pub}")  # noqa: T201
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = OneLineParser(prog="fedkd-federation", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = sub.add_parser("run", help="a local federation on 127.0.0.1")
    run.add_argument("--nodes", type=int, default=3)
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--strategy", default="fedmd")
    run.add_argument("--model", default="hetero",
                     help="the server's model config group: the names --archs may use")
    run.add_argument("--archs", default="cnn_small,mlp,cnn_teacher",
                     help="comma-separated node architectures, cycled ('' = server assigns)")
    run.add_argument("--secure", action="store_true", help="TLS + SuperNode authentication")
    run.add_argument("--public", choices=["file", "embedded"], default="file")
    run.add_argument("--poll-interval", type=float, default=0.1)
    run.add_argument("--launcher", choices=LAUNCHERS, default="worker",
                     help="worker: fedkd-supernode (persistent ClientApp worker); cold: "
                          "fedkd-supernode, a ClientApp process per message; flower: "
                          "flower-supernode as shipped")
    run.add_argument("--round-timeout", type=float, default=120.0)
    run.add_argument("--timeout", type=float, default=900.0, help="longest wait for the run")
    run.add_argument("--workdir", default=None,
                     help="work folder: data, logs, results (default: a new temporary folder)")
    run.add_argument("--clean", action="store_true",
                     help="remove the temporary work folder after a successful run "
                          "(default: keep it; not with --workdir)")
    run.add_argument("--kill-node", type=int, default=None, help="SIGKILL this node mid-run")
    run.add_argument("--kill-after-round", type=int, default=1)
    run.add_argument("--kill-delay", type=float, default=0.3,
                     help="seconds after that round's end (the next round is under way)")
    run.add_argument("--restart-delay", type=float, default=2.0)
    run.add_argument("--restart-fresh", action="store_true",
                     help="delete the killed node's checkpoints before restarting it (control)")
    run.add_argument("overrides", nargs="*", help="Hydra overrides for the server")
    run.set_defaults(func=_run)
    export = sub.add_parser("export", help="one data file per device")
    export.add_argument("--out", required=True)
    export.add_argument("--nodes", type=int, default=3)
    export.add_argument("overrides", nargs="*", help="Hydra overrides (dataset=..., partition=...)")
    export.set_defaults(func=_export)
    certs = sub.add_parser("certs", help="CA + SuperLink certificate")
    certs.add_argument("--out", required=True)
    certs.add_argument("--host", action="append", required=True,
                       help="address the SuperNodes dial (IP or DNS name); repeat for several")
    certs.add_argument("--days", type=int, default=365)
    certs.set_defaults(func=_certs)
    keys = sub.add_parser("keys", help="SuperNode authentication keys")
    keys.add_argument("--out", required=True)
    keys.add_argument("--nodes", type=int, default=3)
    keys.set_defaults(func=_keys)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedkd-federation``."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    cli = parser()
    args = cli.parse_args(argv)
    try:
        check_args(args)
    except ConfigError as err:
        cli.refuse(err)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
