"""Sampling by partition id: which node holds which partition, learned from the nodes themselves.

Flower node ids are random per run, so a strategy that samples node ids gives another run for the
same seed whenever ``fraction_train < 1``. fedkd's strategies sample partition ids instead
(`fedkd.sampling.sample_partitions`, seeded by the strategy seed and the round) and map them to
nodes with a `PartitionMap`:

- before sampling, every free node the map does not know yet gets one empty ``query.whoami``
  message (`identify`); the ClientApp answers its ``partition-id`` and nothing else;
- every later reply carries ``partition-id`` too and refreshes the map (`PartitionMap.refresh`);
- an answer that is not an int in ``0..num_partitions - 1`` (`fedkd.reply_checks.partition_id`),
  or claims a partition another connected node holds, is dropped with a warning naming the node
  and the field. Behind a `fedkd.wire.WireGrid` the wire's `fedkd.reply_guard.ReplyGuard` has
  dropped such answers already (and binds each node to its first partition for the run); this
  map only keeps who holds what for sampling.

With ``fraction_train = 1`` (or every free node sampled anyway) nothing is asked: `sample_nodes`
returns the free nodes as they are, as before. In simulation the engine itself knows which node
holds which partition (`PartitionSampling.engine_partitions`, set by the simulation launcher):
then no node is asked either, which at 10,000 clients saves a wave of 10,000 messages.
`PartitionSampling` gives a Flower strategy (`KDStrategy`, fedkd's `FedAvg`) this `sample`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedkd import reply_checks
from fedkd.protocol import METRICS, PARTITION_ID, WHOAMI
from fedkd.sampling import sample_partitions, sample_size
from fedkd.strategies.checkpointed import Nodes

log = logging.getLogger(__name__)


class PartitionMap:
    """Node id -> partition id, as the nodes reported it (one node per partition)."""

    def __init__(self) -> None:
        self.by_node: dict[int, int] = {}
        self._by_partition: dict[int, int] = {}  # the inverse, for O(1) look-ups

    def holder(self, partition_id: int) -> int | None:
        """The node known to hold `partition_id`, if any."""
        return self._by_partition.get(partition_id)

    def learn(self, node: int, value: object, num_partitions: int, server_round: int,
              quiet: bool = False) -> bool:
        """Record that `node` holds partition `value`; a bad or taken id is dropped (warned
        unless `quiet`). Returns whether it was recorded."""
        try:
            value = reply_checks.partition_id(value, num_partitions)
            if (other := self.holder(value)) not in (None, node):
                raise reply_checks.ReplyError(
                    f"{METRICS}.{PARTITION_ID}={value} is held by node {other}")
        except reply_checks.ReplyError as err:
            if not quiet:
                log.warning("round %d: node %s: %s; answer dropped", server_round, node, err)
            return False
        if self.by_node.get(node, value) != value:
            log.warning("round %d: node %s now reports %s %d (was %d)", server_round, node,
                        PARTITION_ID, value, self.by_node[node])
            del self._by_partition[self.by_node[node]]
        self.by_node[node] = value
        self._by_partition[value] = node
        return True

    def refresh(self, replies: Iterable[Message], num_partitions: int, server_round: int) -> None:
        """Learn from the ``partition-id`` every valid reply carries (their parser warns)."""
        for reply in replies:
            if not reply.has_error():
                value = reply.content.metric_records.get(METRICS, {}).get(PARTITION_ID)
                self.learn(reply.metadata.src_node_id, value, num_partitions, server_round,
                           quiet=True)

    def restore(self, by_node: dict[int, int]) -> None:
        """Replace what is known by `by_node` (node id -> partition id; a checkpoint's, mapped
        onto this run's nodes)."""
        self.by_node = {int(n): int(p) for n, p in by_node.items()}
        self._by_partition = {p: n for n, p in self.by_node.items()}

    def forget_gone(self, connected: Iterable[int]) -> None:
        """Drop nodes no longer connected (a restarted node comes back under a new id)."""
        alive = set(connected)
        self.by_node = {n: p for n, p in self.by_node.items() if n in alive}
        self._by_partition = {p: n for n, p in self.by_node.items()}


def free_nodes(grid: Grid, nodes: Iterable[int]) -> list[int]:
    """`nodes` that owe no reply (a `WireGrid` tracks stragglers; another grid has none), sorted."""
    busy = grid.busy_node_ids() if hasattr(grid, "busy_node_ids") else set()
    return sorted(set(nodes) - busy)


def whoami_message(node: int, server_round: int) -> Message:
    """The empty ``query.whoami`` request to `node`."""
    return Message(RecordDict(), dst_node_id=node, message_type=WHOAMI, group_id=str(server_round))


def identify(grid: Grid, nodes: list[int], partitions: PartitionMap, num_partitions: int,
             server_round: int, timeout: float) -> None:
    """Ask `nodes` which partition they hold (one ``query.whoami`` wave) and learn the answers."""
    if not nodes:
        return
    replies = grid.send_and_receive([whoami_message(n, server_round) for n in nodes],
                                    timeout=timeout)
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("round %d: node %s could not say its %s: %s", server_round, node,
                        PARTITION_ID, reply.error.reason)
            continue
        metrics = reply.content.metric_records.get(METRICS, {})
        partitions.learn(node, metrics.get(PARTITION_ID), num_partitions, server_round)


def sample_nodes(
    grid: Grid, partitions: PartitionMap, connected: list[int], free: list[int], *,
    num_partitions: int, fraction: float, min_nodes: int, seed: int, server_round: int,
    timeout: float,
) -> list[int]:
    """The free nodes whose partitions `sample_partitions` picks this round, sorted.

    With ``fraction = 1``, or when every free node is sampled anyway, the free nodes are returned
    without asking anything (also a node that joined late, beyond the partitions); otherwise
    the free nodes `partitions` does not know are asked first (`identify`), and a free node that
    still has no valid partition id is never sampled (warned).
    """
    if fraction >= 1.0 or sample_size(num_partitions, fraction, min_nodes) >= len(free):
        return sorted(free)
    partitions.forget_gone(connected)
    unknown = [n for n in free if n not in partitions.by_node]
    identify(grid, unknown, partitions, num_partitions, server_round, timeout)
    holders = {partitions.by_node[n]: n for n in free if n in partitions.by_node}
    if len(holders) < len(free):
        log.warning("round %d: %d free node(s) without a valid %s are not sampled", server_round,
                    len(free) - len(holders), PARTITION_ID)
    chosen = sample_partitions(num_partitions, fraction, min_nodes, seed, server_round,
                               available=holders)
    log.debug("round %d: partitions %s of %d", server_round, chosen, num_partitions)
    return sorted(holders[p] for p in chosen)


class PartitionSampling:
    """Mixin for a Flower `Strategy`: `sample` draws partition ids, not node ids.

    The strategy sets ``partitions`` (a `PartitionMap`), ``settings`` (the bound run settings:
    ``len(settings.assignment)`` partitions), ``fraction_train``, ``min_train_nodes``,
    ``min_available_nodes``, ``wait_for_nodes_s`` and ``seed``.
    """

    engine_partitions: Callable[[], dict[int, int]] | None = None
    """Simulation only: node id -> partition id as the engine assigned them (trusted: not from
    the wire); nodes it names are never asked ``query.whoami``."""
    whoami_timeout_s: float | None = None
    """Longest wait for the ``query.whoami`` answers; None: the round timeout `start` was given
    (in simulation the first contact also starts the clients' actors, which can take a minute)."""
    round_timeout_s: float = 600.0

    def start(self, grid: Grid, initial_arrays: Any, num_rounds: int = 3, timeout: float = 3600,
              *args: Any, **kwargs: Any) -> Any:
        """Flower's `Strategy.start`, remembering the round timeout for the whoami wave."""
        self.round_timeout_s = float(timeout)
        return super().start(grid, initial_arrays, num_rounds, timeout, *args, **kwargs)

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        """The free nodes (connected, owing no reply) of this round's seeded sample of partition
        ids (`sample_nodes`), after waiting (at most `wait_for_nodes_s`) for
        `min_available_nodes`."""
        if self.settings is None:
            raise RuntimeError(f"{type(self).__name__}.bind(settings) was not called before the "
                               "first round")
        wait = getattr(grid, "wait_for_nodes", None)
        nodes = (wait(self.min_available_nodes, self.wait_for_nodes_s) if wait
                 else list(grid.get_node_ids()))
        num_partitions = len(self.settings.assignment)
        if self.engine_partitions is not None and self.fraction_train < 1 and any(
                n not in self.partitions.by_node for n in nodes):
            for node, pid in self.engine_partitions().items():
                if node not in self.partitions.by_node:
                    self.partitions.learn(node, pid, num_partitions, server_round)
        return sample_nodes(
            grid, self.partitions, nodes, free_nodes(grid, nodes),
            num_partitions=num_partitions, fraction=self.fraction_train,
            min_nodes=self.min_train_nodes, seed=self.seed, server_round=server_round,
            timeout=self.whoami_timeout_s or self.round_timeout_s)

    def partition_state(self, nodes: Nodes) -> dict[str, Any]:
        """What the partition map knows, per partition (node ids differ from run to run)."""
        return {"partitions": nodes.to_partitions(self.partitions.by_node)}

    def load_partition_state(self, state: dict[str, Any], nodes: Nodes) -> None:
        """Inverse of `partition_state`, onto this run's nodes."""
        self.partitions.restore(nodes.to_nodes(state["partitions"]))

    def learn_partitions(self, server_round: int, replies: Iterable[Message]) -> None:
        """Refresh the partition map from the ``partition-id`` of `replies` (once bound)."""
        if self.settings is not None:
            self.partitions.refresh(replies, len(self.settings.assignment), server_round)
