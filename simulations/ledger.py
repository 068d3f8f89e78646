"""Who should have answered, who did, and what the strategy made of it: a run's `RoundFacts`.

The `Recorder` feeds a `Ledger` every wave on the wire and every server metric; at the end the
ledger's `RunFacts` go to `fedkd.simulations.status.run_status`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedkd.sampling import sample_size
from fedkd.simulations.status import RoundFacts, RunFacts
from fedkd.strategies.base import BELOW_MIN_REPLIES, REJECTED_REPLIES, VALID_REPLIES
from fedkd.strategies.checkpointed import Nodes


class Ledger:
    """Collects `RoundFacts` from the waves and the strategy's server metrics (the `Recorder`
    feeds it) and judges the run (`facts`, then `run_status`).

    Parameters
    ----------
    num_clients : int
        Clients (partitions) of the run.
    per_round : int or None
        Clients the config samples per round (`fedkd.sampling.sample_size`); None: all.
    """

    def __init__(self, num_clients: int, per_round: int | None = None) -> None:
        self.num_clients = num_clients
        self.per_round = num_clients if per_round is None else per_round
        self.rounds: dict[int, RoundFacts] = {}
        self.partition_of: dict[int, int] = {}  # node id -> partition id, from valid replies

    def on_wave(self, server_round: int, message_type: str, asked: int, answered: Mapping[int, int],
                errored: Iterable[int], dropped: int = 0) -> None:
        """One wave: `asked` clients, `answered` node id -> partition id, `errored` node ids of
        error replies, `dropped` replies dropped as malformed on the wire."""
        facts = self.rounds.setdefault(server_round, RoundFacts())
        facts.dropped += dropped
        valid = {n: p for n, p in answered.items() if 0 <= p < self.num_clients}
        self.partition_of.update(valid)
        if not message_type.startswith("train"):
            return
        asked = max(asked, self.per_round)
        failed, unknown = missing_clients(asked, self.num_clients, valid.values(),
                                          [self.partition_of.get(n) for n in errored])
        facts.asked += asked
        facts.answered += len(set(valid.values()))
        facts.failed |= failed
        facts.unidentified += unknown

    def on_server_metrics(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """The strategy's account of its aggregation (`fedkd.strategies.base.VALID_REPLIES`...)."""
        facts = self.rounds.setdefault(server_round, RoundFacts())
        if VALID_REPLIES in metrics:
            facts.valid = int(metrics[VALID_REPLIES])
        facts.dropped += int(metrics.get(REJECTED_REPLIES, 0))
        facts.below_min |= bool(metrics.get(BELOW_MIN_REPLIES, 0))

    def state_dict(self, nodes: Nodes) -> dict[str, Any]:
        """The round facts so far and what each node reported (by partition: a checkpoint's)."""
        rounds = {r: {**vars(f), "failed": sorted(f.failed)} for r, f in self.rounds.items()}
        return {"rounds": rounds, "partition_of": nodes.to_partitions(self.partition_of)}

    def load_state_dict(self, state: dict[str, Any], nodes: Nodes) -> None:
        """Inverse of `state_dict`, onto this run's nodes."""
        self.rounds = {int(r): RoundFacts(**{**f, "failed": set(f["failed"])})
                       for r, f in state["rounds"].items()}
        self.partition_of = nodes.to_nodes(state["partition_of"])

    def facts(self, last_eval: dict[int, tuple[int, float]], best_mean_accuracy: float | None,
              num_classes: int | None, first_error: str | None) -> RunFacts:
        """The `RunFacts` of the run so far."""
        return RunFacts(num_clients=self.num_clients, num_classes=num_classes, last_eval=last_eval,
                        rounds=self.rounds, best_mean_accuracy=best_mean_accuracy,
                        full_final=self.per_round >= self.num_clients, first_error=first_error)


def missing_clients(asked: int, num_clients: int, answered: Iterable[int],
                    errored: Iterable[int | None]) -> tuple[set[int], int]:
    """The failed partitions of a train wave, and how many failures are not identified.

    With every client asked, a failed client is one that did not answer; otherwise only the
    error replies of nodes whose partition is known can be named.

    Parameters
    ----------
    asked : int
        Clients the wave asked.
    num_clients : int
        Clients of the run.
    answered : iterable of int
        Partition ids that answered.
    errored : iterable of int or None
        The partition ids of the error replies' nodes (None: not known).
    """
    answered = set(answered)
    if asked >= num_clients:
        failed = set(range(num_clients)) - answered
        return failed, max(0, asked - len(answered) - len(failed))
    named = {p for p in errored if p is not None} - answered
    return named, max(0, asked - len(answered) - len(named))


def clients_per_round(cfg: Any) -> int:
    """Clients the strategy asks each round: its training sample (`fedkd.sampling.sample_size`),
    or its evaluation sample when that is smaller (Flower's ``fraction_evaluate``)."""
    n, flower = int(cfg.num_clients), cfg.strategy.get("flower") or {}
    train = sample_size(n, float(flower.get("fraction_train", 1.0)),
                        int(flower.get("min_train_nodes", 0)))
    evaluate = sample_size(n, float(flower.get("fraction_evaluate", 1.0)),
                           int(flower.get("min_evaluate_nodes", 0)))
    return min(train, evaluate)
