"""Per-round latency of a real deployment on 127.0.0.1, against the clients' compute time.

Runs the same federation (digits, N SuperNodes with their own files, heterogeneous students,
FedMD) once per SuperNode launcher:

- ``flower``: Flower's ``flower-supernode`` as shipped (3 s idle polls, 1 s first pull retry,
  one fresh ClientApp process per message);
- ``cold``: ``fedkd-supernode --cold`` (short polls, still a fresh process per message);
- ``worker``: ``fedkd-supernode`` (short polls, one persistent ClientApp worker).

For each round it reports the latency the server saw (``elapsed_s`` differences), the slowest
client's handler time measured during the run (``compute-s``; the nodes share this machine's
cores, so it is inflated by contention), and, as a reference, the slowest client's handler time
when each client runs alone in this process (same files, same handler, no Flower messaging).

    python -m benchmarks.deploy_latency [--nodes 3] [--rounds 3] [--launchers worker,cold,flower]
        [--out docs/results/deploy_latency.md]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedkd.deploy.federation import LocalFederation, Options
from fedkd.deploy.latency import round_latency

log = logging.getLogger("benchmarks.deploy_latency")


def alone(fed: LocalFederation, rounds: int) -> pd.Series:
    """Slowest client's handler time per round, each client running alone in this process."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedkd.client import app as client_app
    from fedkd.records import transfer_record
    from fedkd.server import compose_config, prepare_run

    assert fed.files is not None
    run = prepare_run(compose_config(fed.server_overrides()))
    rows = np.arange(run.data.num_public)
    soft = np.full((len(rows), run.data.num_classes), 1 / run.data.num_classes, dtype=np.float32)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    contexts = [Context(run_id=1, node_id=10 + i, state=RecordDict(), run_config={},
                        node_config=_parse(fed.node_config(i)))
                for i in range(fed.options.num_nodes)]
    slowest = {}
    for r in range(1, rounds + 1):
        config = ConfigRecord({**run.settings.to_config(), "server-round": r})
        transfer = transfer_record(soft if r > 1 else None, rows if r > 1 else None, rows)
        times = []
        for i, ctx in enumerate(contexts):
            TaskIdentity.node_id = 1  # a message is created by the server, answered by node i
            msg = Message(RecordDict({"config": config, "transfer": transfer}), dst_node_id=10 + i,
                          message_type="train.distill", group_id=str(r))
            msg.metadata.__dict__["_message_id"] = f"bench-{r}-{i}"
            TaskIdentity.node_id = 10 + i
            reply = client_app.app(msg, ctx)
            times.append(float(reply.content["metrics"]["compute-s"]))
        slowest[r] = max(times)
    return pd.Series(slowest, name="alone_compute_s")


def markdown(table: pd.DataFrame) -> str:
    """A small markdown table (index included), floats with two decimals."""
    frame = table.reset_index()
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
             for row in frame.itertuples(index=False)]
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    return "\n".join([head, rule, *("| " + " | ".join(row) + " |" for row in cells)])


def _parse(node_config: str) -> dict[str, object]:
    """A ``--node-config`` string back into a dict (the values fedkd writes: ints, quoted text)."""
    import shlex

    out: dict[str, object] = {}
    for item in shlex.split(node_config):
        key, value = item.split("=", 1)
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def measure(launcher: str, nodes: int, rounds: int, workdir: Path) -> tuple[pd.DataFrame, dict]:
    """One federation run; the latency table and wall times."""
    opts = Options(num_nodes=nodes, rounds=rounds, launcher=launcher, round_timeout=300)
    start = time.monotonic()
    with LocalFederation(workdir / launcher, opts) as fed:
        result = fed.run(timeout=900)
        reference = alone(fed, rounds) if launcher == "worker" else None
    if result.out_dir is None:
        raise RuntimeError(f"{launcher}: the run failed; see {result.log_path}")
    table = round_latency(result.out_dir / "metrics.parquet").set_index("round")
    if reference is not None:
        table = table.join(reference)
    walls = {"flwr_run_s": result.seconds, "strategy_s": result.summary["wall_time_s"],
             "total_s": time.monotonic() - start,
             "final_accuracy": result.summary["final_accuracy_by_client"]}
    return table, walls


def main(argv: list[str] | None = None) -> None:
    """Run the launchers, print (and optionally write) one markdown table each."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy_latency")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--launchers", default="worker,cold,flower")
    parser.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    lines = []
    with tempfile.TemporaryDirectory(prefix="fedkd-deploy-bench-") as tmp:
        for launcher in args.launchers.split(","):
            table, walls = measure(launcher, args.nodes, args.rounds, Path(tmp))
            lines += [f"### {launcher}", "",
                      f"flwr run {walls['flwr_run_s']:.1f} s (strategy "
                      f"{walls['strategy_s']:.1f} s), final accuracy by client "
                      f"{walls['final_accuracy']}", "",
                      markdown(table), ""]
            log.info("%s:\n%s", launcher, table.to_string(float_format="%.2f"))
    text = "\n".join(lines)
    print(text)  # noqa: T201 (benchmark output)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
