"""Results of one run: tidy metric rows, a summary and a plot, written as the run goes.

`Recorder.on_replies` observes every wave on the wire (see `fedkd.wire.WireGrid`), turns reply
metrics into rows ``round, client, model, metric, value``, logs progress once a round's
accuracies are in, and rewrites ``metrics.parquet`` so a crash late in a run loses nothing.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Message

from fedkd.protocol import (
    COMPUTE_S, DP_METRICS, METRICS, NODE, OWN_ACCURACY, PARTITION_ID, PHASES, TEST_ACCURACY,
    phase_key,
)
from fedkd.simulations.ledger import Ledger, clients_per_round
from fedkd.simulations.status import FAILED, INTERRUPTED, RunFacts, failed_rounds, run_status
from fedkd.simulations.summary_maths import (
    dpsgd_summary, honest_mean, mean_by_client, own_accuracy_rounds, own_test_sizes, top_k_mean,
    write_parquet, write_text,
)
from fedkd.strategies.base import AGGREGATION_METRICS, ANOMALY_SCORE, split_client_metric
from fedkd.strategies.checkpointed import Nodes
from fedkd.wire import WireStats

log = logging.getLogger("fedkd.progress")

RECORDED = (TEST_ACCURACY, "test-loss", OWN_ACCURACY, "train-loss", "digest-loss",
            COMPUTE_S, *(phase_key(p) for p in PHASES), *DP_METRICS)
TOP_K = 5  # FedGen reports the mean of the top 5 rounds
DROPPED = "replies-dropped"
"""Wire metric: replies of a wave that failed the server's checks (`fedkd.reply_guard`)."""
COLUMNS = ["round", "client", "model", "metric", "value"]
WIRE = -1  # client id of the rows that describe traffic


class Recorder:
    """Collects metric rows of a run and writes ``metrics.parquet``, ``summary.json``, a plot."""

    def __init__(self, out_dir: Path, archs: list[str], info: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.archs = archs
        self.info = info
        self.rows: list[tuple[int, int, str, str, float]] = []
        self.bytes_up = self.bytes_down = 0
        self.replies: dict[int, tuple[int, int, int, int]] = {}  # round -> (ok, asked, errors, dropped)
        self.first_error: str | None = None
        self.server_metrics: dict[str, float] = {}
        # what went wrong, round by round (the status)
        self.ledger = Ledger(len(archs), info.get("clients_per_round"))
        self.last_round = 0  # the last round whose accuracies are all in
        self._t0 = time.monotonic()

    @classmethod
    def for_run(cls, run: Any, out_dir: Path) -> Recorder:
        """A recorder for a `fedkd.server.PreparedRun`."""
        from fedkd.server import describe
        from fedkd.simulations.faults import fault_plan, fault_summary

        cfg = run.cfg
        info = {
            "strategy": str(cfg.strategy.name),
            "aggregator": _component_name(cfg, "aggregator"),
            "transfer": _component_name(cfg, "transfer"),
            "dataset": str(cfg.dataset.name),
            "num_clients": int(cfg.num_clients),
            "num_rounds": int(cfg.num_rounds),
            "seed": int(cfg.seed),
            "num_classes": int(run.data.num_classes),
            "clients_per_round": clients_per_round(cfg),
            **describe(run),  # partition, partition_seed (none with dataset=nodes), archs, ...
            "own_test_sizes": own_test_sizes(run.data),
            **fault_summary(fault_plan(cfg)),  # faults: who misbehaved (None: nobody)
        }
        return cls(out_dir, run.archs, info)

    # --- collecting -----------------------------------------------------------------------
    def record(self, server_round: int, client: int, metric: str, value: float,
               model: str | None = None) -> None:
        """Add one tidy row (client -1: the wire or the server)."""
        if model is None:
            model = self.archs[client] if 0 <= client < len(self.archs) else "wire"
        self.rows.append((int(server_round), int(client), model, metric, float(value)))

    def on_server_metrics(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """What the strategy computed on the server this round (e.g. privacy spent)."""
        for key, value in metrics.items():
            about = split_client_metric(key)  # ``<name>/<client>``: a row of that client
            if about is not None and 0 <= about[1] < len(self.archs):
                self.record(server_round, about[1], about[0], value)
            else:
                self.record(server_round, WIRE, key, value, model="server")
        self.ledger.on_server_metrics(server_round, metrics)
        self.server_metrics.update({k: v for k, v in metrics.items()
                                    if k not in AGGREGATION_METRICS
                                    and split_client_metric(k) is None})

    def on_replies(self, server_round: int, replies: list[Message], stats: WireStats) -> None:
        """Observer of `WireGrid`: traffic, reply metrics, progress.

        The wire shows it only replies its check accepted (`fedkd.reply_guard`: one per
        partition, every value in range) and error replies; `stats.dropped` counts the others,
        recorded per wave as the ``replies-dropped`` wire metric."""
        self.bytes_up += stats.bytes_up
        self.bytes_down += stats.bytes_down
        self.record(server_round, WIRE, "bytes_up", stats.bytes_up)
        self.record(server_round, WIRE, "bytes_down", stats.bytes_down)
        self.record(server_round, WIRE, DROPPED, stats.dropped)
        asked = stats.sent + stats.skipped_busy
        if stats.message_type.startswith("train"):
            ok = stats.replied - stats.errors - stats.dropped
            self.replies[server_round] = (ok, asked, stats.errors, stats.dropped)
        got_accuracy = False
        answered: dict[int, int] = {}  # node id -> partition id (the wire let one per partition)
        for reply in replies:
            if reply.has_error():
                self.first_error = self.first_error or reply.error.reason
                continue
            metrics = reply.content.metric_records.get(METRICS)
            if metrics is None or PARTITION_ID not in metrics:
                continue
            client = int(metrics[PARTITION_ID])
            answered[reply.metadata.src_node_id] = client
            if NODE in reply.content:
                self.learn_node(client, reply.content[NODE])
            for key in RECORDED:
                if key in metrics:
                    self.record(server_round, client, key, float(metrics[key]))
            got_accuracy |= TEST_ACCURACY in metrics or OWN_ACCURACY in metrics
        self.ledger.on_wave(server_round, stats.message_type, asked, answered,
                            [r.metadata.src_node_id for r in replies if r.has_error()],
                            stats.dropped)
        if got_accuracy:
            self.end_round(server_round)

    def learn_node(self, client: int, node: Mapping[str, Any]) -> None:
        """A deployed node's own arch and role (its node config may override the assignment)."""
        if not 0 <= client < len(self.archs):
            return
        arch, role = str(node.get("arch", self.archs[client])), node.get("role")
        if arch != self.archs[client]:
            log.info("client %d runs %s (node config), not %s", client, arch, self.archs[client])
        self.archs[client] = arch
        if isinstance(self.info.get("archs"), list):
            self.info["archs"][client] = arch
        if role is not None and isinstance(self.info.get("roles"), list):
            self.info["roles"][client] = str(role)

    def end_round(self, server_round: int) -> None:
        """Log one progress line for the round and flush the rows to disk."""
        acc = [v for r, c, _, m, v in self.rows if r == server_round and m == "test-accuracy"]
        self.last_round = max(self.last_round, int(server_round))
        ok, asked, errors, dropped = self.replies.get(server_round, (len(acc), len(acc), 0, 0))
        faults = [f"{n} {what}" for n, what in ((errors, "errors"), (dropped, "dropped")) if n]
        err = f" ({', '.join(faults)})" if faults else ""
        elapsed = time.monotonic() - self._t0
        self.record(server_round, WIRE, "elapsed_s", elapsed)
        text = (f"accuracy mean {np.mean(acc):.3f} min {np.min(acc):.3f} max {np.max(acc):.3f}"
                if acc else "")
        frame = self.frame()
        own = own_accuracy_rounds(frame[frame["round"] == server_round],
                                  self.info.get("own_test_sizes")).get(server_round)
        if own is not None:
            text += f"{' | ' if text else ''}own-label {own:.3f}"
        log.info("round %d/%d | replies %d/%d%s | %s | %.1f s", server_round,
                 self.info["num_rounds"], ok, asked, err, text, elapsed)
        write_parquet(frame, self.out_dir / "metrics.parquet")

    # --- checkpoints (`fedkd.strategies.checkpointed`) -----------------------------------------
    def state_dict(self, nodes: Nodes) -> dict[str, Any]:
        """Everything recorded so far (rows, bytes, the ledger, the time elapsed)."""
        return {"rows": [list(row) for row in self.rows], "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "replies": {r: list(v) for r, v in self.replies.items()},
                "first_error": self.first_error, "server_metrics": dict(self.server_metrics),
                "last_round": self.last_round, "elapsed_s": time.monotonic() - self._t0,
                "archs": list(self.archs), "info_archs": self.info.get("archs"),
                "info_roles": self.info.get("roles"), "ledger": self.ledger.state_dict(nodes)}

    def load_state_dict(self, state: dict[str, Any], nodes: Nodes) -> None:
        """Continue from `state_dict`: later rows follow the restored ones; the clock goes on
        from the time the checkpointed run had taken."""
        self.rows = [(int(r), int(c), str(m), str(k), float(v)) for r, c, m, k, v in state["rows"]]
        self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
        self.replies = {int(r): tuple(v) for r, v in state["replies"].items()}
        self.first_error, self.last_round = state["first_error"], int(state["last_round"])
        self.server_metrics = dict(state["server_metrics"])
        self._t0 = time.monotonic() - float(state["elapsed_s"])
        self.archs[:] = state["archs"]
        for key in ("archs", "roles"):
            if state[f"info_{key}"] is not None:
                self.info[key] = list(state[f"info_{key}"])
        self.ledger.load_state_dict(state["ledger"], nodes)

    # --- reporting ------------------------------------------------------------------------
    def frame(self) -> pd.DataFrame:
        """All rows as a tidy DataFrame."""
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def last_evaluations(self) -> dict[int, tuple[int, float]]:
        """Each client's last test accuracy, with the round it came from."""
        last: dict[int, tuple[int, float]] = {}
        for r, c, _, m, v in self.rows:
            if m == "test-accuracy" and 0 <= c < len(self.archs) and r >= last.get(c, (r, 0))[0]:
                last[c] = (r, v)
        return dict(sorted(last.items()))

    def final_accuracies(self) -> dict[int, float]:
        """Each client's last reported test accuracy."""
        return {c: v for c, (_, v) in self.last_evaluations().items()}

    def facts(self) -> RunFacts:
        """What the run's status is judged by (`fedkd.simulations.status`)."""
        frame = self.frame()
        means = frame[frame.metric == "test-accuracy"].groupby("round")["value"].mean()
        best = float(means.max()) if len(means) else None
        return self.ledger.facts(self.last_evaluations(), best, self.info.get("num_classes"),
                                 self.first_error)

    def finish(self, status: str = "ok", error: str | None = None,
               stop_signal: int | None = None, quick: bool = False) -> dict[str, Any]:
        """Write summary.json, metrics.parquet and accuracy.png; return the summary.

        `status` is how the run ended: ``ok`` (the runner returned), ``failed`` (`error` says
        why) or ``interrupted`` (by `stop_signal`; ``last_round`` is the last completed round).
        The summary's ``status`` and ``status_reasons`` come from `run_status`: a run that ended
        ``ok`` may be ``degraded`` or ``failed`` (then ``error`` is its first reason, never null).
        The summary goes first (a forced exit may follow at any time); an interrupted run gets
        no plot (a stop must be quick), and `quick` writes summary.json alone (a forced exit:
        metrics.parquet is current to the last completed round).
        """
        facts = self.facts()
        signal_name = signal.Signals(stop_signal).name if stop_signal else None
        status, reasons = run_status(status, facts, error, signal_name, self.last_round)
        for reason in [] if status == INTERRUPTED else reasons:
            log.log(logging.ERROR if status == FAILED else logging.WARNING, "run %s: %s", status,
                    reason)
        last = facts.last_eval
        values = [v for _, v in last.values()]
        own = own_accuracy_rounds(self.frame(), self.info.get("own_test_sizes"))
        by_arch: dict[str, list[float]] = {}
        by_role: dict[str, list[float]] = {}
        roles = self.info.get("roles") or ["student"] * len(self.archs)
        for client, (_, value) in last.items():
            by_arch.setdefault(self.archs[client], []).append(value)
            by_role.setdefault(roles[client], []).append(value)
        clients = range(len(self.archs))
        summary = {
            **self.info,
            "status": status,
            "status_reasons": reasons,
            "error": reasons[0] if status == FAILED else None,
            "last_round": self.last_round,
            "stop_signal": signal_name,
            "final_mean_accuracy": float(np.mean(values)) if values else None,
            "final_min_accuracy": float(np.min(values)) if values else None,
            "final_max_accuracy": float(np.max(values)) if values else None,
            "final_mean_accuracy_honest": honest_mean(last, self.info.get("honest_clients")),
            "final_accuracy_by_arch": {k: float(np.mean(v)) for k, v in sorted(by_arch.items())},
            "final_accuracy_by_role": {k: float(np.mean(v)) for k, v in sorted(by_role.items())},
            "final_accuracy_by_client": {str(c): last.get(c, (0, None))[1] for c in clients},
            "final_accuracy_round_by_client": {str(c): last.get(c, (None,))[0] for c in clients},
            "failed_rounds_by_client": {str(c): r for c, r in failed_rounds(facts.rounds).items()},
            "replies_dropped": sum(f.dropped for f in facts.rounds.values()),
            "rounds_below_min_replies": sorted(r for r, f in facts.rounds.items() if f.below_min),
            "anomaly_score_by_client": mean_by_client(self.frame(), ANOMALY_SCORE),
            "final_own_accuracy": own[max(own)] if own else None,
            f"top{TOP_K}_own_accuracy": top_k_mean(list(own.values()), TOP_K) if own else None,
            "bytes_up": int(self.bytes_up),
            "bytes_down": int(self.bytes_down),
            "wall_time_s": round(time.monotonic() - self._t0, 3),
            **dpsgd_summary(self.frame()),
            **self.server_metrics,
        }
        write_text(json.dumps(summary, indent=2), self.out_dir / "summary.json")
        if quick:
            return summary
        frame = self.frame()
        write_parquet(frame, self.out_dir / "metrics.parquet")
        if values and status != INTERRUPTED:
            from fedkd.simulations.plots import plot_accuracy

            plot_accuracy(frame, self.out_dir / "accuracy.png", title=_title(self.info))
        return summary


def _component_name(cfg: Any, key: str) -> str | None:
    """Name of a part the strategy uses (aggregator, transfer): what its `_target_` names."""
    flower = cfg.strategy.get("flower") or {}
    node = flower.get(key) if hasattr(flower, "get") else None
    return str(node["_target_"]).rsplit(".", 1)[-1] if node else None


def _title(info: dict[str, Any]) -> str:
    return (f"{info['strategy']} on {info['dataset']} ({info['partition']}), "
            f"{info['num_clients']} clients, seed {info['seed']}")
