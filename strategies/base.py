"""The shared base of fedkd's logit-exchange strategies: one fused message per client per round.

Flower's `Strategy.start` runs the round loop; this base only fills its hooks:

- `configure_train` sends each sampled node the previous round's soft targets plus the next
  transfer batch (indices into the public set, or synthetic inputs) and the client settings;
- `aggregate_train` validates the returned logits, sorts them by partition id, hands them to the
  aggregator and returns the soft targets as the ArrayRecord that `start` passes to the next round;
- evaluation is fused into the train reply, so `configure_evaluate` sends nothing;
- `sample` (`fedkd.strategies.partitions.PartitionSampling`) picks a seeded sample of partition
  ids, not of Flower's random node ids, when ``fraction_train < 1``.

Subclasses override `message_type`, `build_transfer` (what the server sends),
`aggregate_replies` (how valid replies become the next round's record) or `aggregate_logits`;
what logits are asked on comes from the `transfer` source (`fedkd.transfer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd import reply_checks
from fedkd.aggregation import TeacherMeta, answered_rows, anomaly_scores, noise_rng
from fedkd.client_dp import DP_NOISE_STREAM, ClientDP, dp_kind, private_soft_targets
from fedkd.settings import ClientSettings
from fedkd.errors import ConfigError, require_int, require_number
from fedkd.generators import LogitGuided, ModelGuided
from fedkd.sampling import check_sampling
from fedkd.protocol import (
    CONFIG, MESSAGE_TYPE, METRICS, NUM_EXAMPLES, PARTITION_ID, QUERY, QUERY_DIRECTIONS, QUERY_MU,
    QUERY_SEED, SERVER_ROUND, TARGETS, TRANSFER,
)
from fedkd.records import reply_class_counts, reply_logits, rows_of, transfer_record
from fedkd.strategies.checkpointed import Nodes
from fedkd.strategies.partitions import PartitionMap, PartitionSampling, free_nodes
from fedkd.transfer import Public, TransferSource
from fedkd.wire import reply_order

log = logging.getLogger(__name__)
T = TypeVar("T")

Aggregator = Callable[..., np.ndarray]

# --- the strategy's account of each aggregation (server metrics: rows, and the run's status) ---
VALID_REPLIES = "valid-replies"
"""Replies the round aggregated."""
REJECTED_REPLIES = "rejected-replies"
"""Replies (not error replies) the strategy's parser dropped as malformed."""
BELOW_MIN_REPLIES = "below-min-replies"
"""1 when fewer valid replies than ``min_replies`` came, so the previous record stayed; else 0."""
AGGREGATION_METRICS = (VALID_REPLIES, REJECTED_REPLIES, BELOW_MIN_REPLIES)
ANOMALY_SCORE = "anomaly-score"
"""Per aggregated client and round: the mean total-variation distance of its probabilities to
the robust consensus (`fedkd.aggregation.anomaly_scores`), reported as ``anomaly-score/<id>``."""
CLIENT_SEPARATOR = "/"
"""A server metric ``<name>/<partition id>`` is about one client (the Recorder files it so)."""


def client_metric(name: str, client: int) -> str:
    """The server metric key of `name` for one client: ``<name>/<client>``."""
    return f"{name}{CLIENT_SEPARATOR}{int(client)}"


def split_client_metric(key: str) -> tuple[str, int] | None:
    """``(name, client)`` of a per-client server metric key, None for any other key."""
    name, sep, client = key.rpartition(CLIENT_SEPARATOR)
    return (name, int(client)) if sep and name and client.isdigit() else None


class KDStrategy(PartitionSampling, Strategy):
    """Logit exchange on a public transfer set, with a pluggable aggregator.

    Subclasses change what travels by overriding `message_type`, `build_transfer` (what the
    server sends) and `aggregate_replies` (how the valid replies become the next round's record).

    Parameters
    ----------
    aggregator : callable or None
        ``f(logits [K, N, C], meta, temperature=T) -> soft targets [N, C]``; None exchanges nothing
        (each client trains alone).
    fraction_train : float
        Fraction of the partitions sampled each round, by partition id (`fedkd.sampling`; the
        nodes are asked their partition once: `sample`, `fedkd.strategies.partitions`).
    min_train_nodes : int
        Sample at least this many nodes.
    min_available_nodes : int
        Wait for this many connected nodes before sampling (at most `wait_for_nodes_s`).
    min_replies : int
        Fewer valid replies than this leave the soft targets of the previous round in place.
    transfer_size : int or None
        Public rows per round (a fresh seeded sample each round); None uses the whole public set.
        Shorthand for ``transfer=fedkd.transfer.Public(transfer_size, seed)``.
    transfer : TransferSource or None
        What to ask logits on each round (`fedkd.transfer`: the public set, noise, ...); None uses
        the public set as `transfer_size` says.
    temperature : float
        Temperature at which soft targets are formed (the clients distil at the same one).
    seed : int
        Seeds partition sampling (with the round) and the transfer batches.
    wait_for_nodes_s : float
        Longest wait for `min_available_nodes`; then the round goes on with those connected.
    privacy : ClientDP or None
        Client-level DP (`fedkd.client_dp`, ``privacy=client_dp``): each client's probabilities
        (``aggregator=mean_probs``) or logits (``mean_logits``) are clipped and the sum noised.
    """

    message_type = MESSAGE_TYPE
    holds_models = False
    """Whether the server holds the teachers' models (white-box generators need them)."""
    query_timeout_s = 120.0
    """Longest wait for the answers to one query wave of a black-box generator."""

    def __init__(
        self,
        aggregator: Aggregator | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        min_replies: int = 1,
        transfer_size: int | None = None,
        transfer: TransferSource | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        wait_for_nodes_s: float = 60.0,
        privacy: ClientDP | None = None,
    ) -> None:
        check_sampling(fraction_train, min_train_nodes, min_available_nodes, seed,
                       wait_for_nodes_s)
        require_int("min_replies", min_replies, 1)
        require_int("transfer_size", transfer_size, 1, null=True)
        require_number("temperature", temperature, 0.0, low_open=True)
        if aggregator is not None and not callable(aggregator):
            raise ConfigError("aggregator", aggregator, "must be an aggregator (a callable) or null")
        if transfer is not None and not callable(getattr(transfer, "rows", None)):
            raise ConfigError("transfer", transfer, "must be a transfer source (fedkd.transfer)")
        self.aggregator = aggregator
        self.privacy, self._dp_kind = privacy, dp_kind(aggregator, privacy)
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.min_replies = min_replies
        self.transfer = transfer if transfer is not None else Public(transfer_size, seed)
        if isinstance(self.transfer, ModelGuided) and not self.holds_models:
            raise ConfigError(
                "transfer", type(self.transfer).__name__,
                f"is fitted on the teachers' models, which {type(self).__name__} never sees (only "
                "logits leave its clients): use a strategy that uploads weights (strategy=feddf) "
                "or transfer=generator_blackbox")
        self.temperature = temperature
        self.seed = seed
        self.wait_for_nodes_s = wait_for_nodes_s
        self.partitions = PartitionMap()  # node id -> partition id, as the nodes said
        self._asked: dict[int, tuple[np.ndarray, int]] = {}  # round -> (rows, num_classes)
        self.server_metric_sinks: list[Callable[[int, dict[str, float]], None]] = []
        self.settings: ClientSettings | None = None
        self._valid: dict[int, int] = {}  # round -> valid replies (`enough`), until reported

    def bind(self, settings: ClientSettings) -> None:
        """Tell the strategy which run it drives (data, architectures, roles, rounds).

        The settings also travel to the clients in every message; the strategy never parses
        them back from the config it sends."""
        self.settings = settings

    def run_settings(self) -> ClientSettings:
        """The bound run settings (`bind` comes before the first round)."""
        if self.settings is None:
            raise RuntimeError(f"{type(self).__name__}.bind(settings) was not called before the "
                               "first round")
        return self.settings

    # --- checkpoints (`fedkd.strategies.checkpointed`) ------------------------------------------
    def state_dict(self, nodes: Nodes) -> dict[str, Any]:
        """What this strategy carries from one round to the next, at a round's end: the partition
        map, and the state of a stateful aggregator or transfer source (their ``state_dict()``).
        What lives within a round (`_asked`, `_valid`) is empty then; the soft targets are the
        ArrayRecord the round loop keeps. A subclass adds its own."""
        state = self.partition_state(nodes)
        for name, part in (("aggregator", self.aggregator), ("transfer", self.transfer),
                           ("privacy", self.privacy)):
            if callable(getattr(part, "state_dict", None)):
                state[name] = part.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], nodes: Nodes) -> None:
        """Inverse of `state_dict` (after `bind`)."""
        self.load_partition_state(state, nodes)
        if "aggregator" in state:
            self.aggregator.load_state_dict(state["aggregator"])
        if "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
        if "transfer" in state:
            self.transfer.load_state_dict(state["transfer"], self.run_settings())

    # --- hooks subclasses may override ------------------------------------------------------
    def transfer_rows(self, server_round: int, settings: ClientSettings) -> np.ndarray | None:
        """Rows to ask logits on this round (None: ask nothing): the transfer source's choice."""
        if self.aggregator is None:
            return None
        return self.transfer.rows(server_round, settings)

    def fit_transfer(self, server_round: int, settings: ClientSettings, grid: Grid,
                     config: ConfigRecord) -> None:
        """Let a transfer source that learns from the teachers' logits (a black-box generator)
        query the connected nodes before this round's transfer set is drawn."""
        if self.aggregator is None or not isinstance(self.transfer, LogitGuided):
            return
        query = partial(self.query, grid, server_round, settings, config)
        metrics = self.transfer.fit_logits(server_round, settings, query)
        if metrics:
            for sink in self.server_metric_sinks:
                sink(server_round, metrics)

    def query(self, grid: Grid, server_round: int, settings: ClientSettings, config: ConfigRecord,
              inputs: np.ndarray, seed: int, directions: int, mu: float) -> np.ndarray | None:
        """Logits ``[K, (1 + Q) * N, C]`` of every free node on `inputs` and their seeded
        perturbations (`fedkd.protocol.expand_query`); None below `min_replies` valid answers."""
        nodes = free_nodes(grid, grid.get_node_ids())
        round_config = ConfigRecord({**config, SERVER_ROUND: server_round, QUERY_SEED: seed,
                                     QUERY_DIRECTIONS: directions, QUERY_MU: float(mu)})
        content = RecordDict({CONFIG: round_config,
                              QUERY: ArrayRecord({f"{QUERY}.inputs": Array(inputs.astype(np.float32))})})
        messages = [Message(content, dst_node_id=node, message_type=QUERY, group_id=str(server_round))
                    for node in nodes]
        replies = sorted((r for r in grid.send_and_receive(messages, timeout=self.query_timeout_s)
                          if not r.has_error()), key=reply_order)
        rows, classes = len(inputs) * (1 + directions), int(settings.data["num_classes"])
        logits = [v for _, v in parse_replies(server_round, replies,
                                              lambda r: reply_logits(r, rows, classes))]
        if len(logits) < self.min_replies:
            log.warning("round %d: %d valid query answers < min_replies=%d; the generator waits",
                        server_round, len(logits), self.min_replies)
            return None
        return np.stack(logits)

    def set_output_dir(self, path: str) -> None:
        """Where the transfer source keeps its checkpoints and pictures (if it has any)."""
        if hasattr(self.transfer, "set_output_dir"):
            self.transfer.set_output_dir(path)

    def aggregate_logits(self, logits: np.ndarray, meta: TeacherMeta) -> np.ndarray:
        """Soft targets [N, C] from the teachers' logits [K, N, C]."""
        assert self.aggregator is not None
        if self.privacy is not None:
            soft = private_soft_targets(logits, self._dp_kind, self.privacy, self.temperature,
                                        noise_rng(meta, DP_NOISE_STREAM))
            self.privacy.spend(self.fraction_train)
            return soft
        return self.aggregator(logits, meta, temperature=self.temperature)

    # --- Flower hooks -------------------------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's settings."""
        name = getattr(self.aggregator, "func", self.aggregator)
        log.info("%s: aggregator=%s transfer=%s fraction_train=%s min_replies=%d T=%s",
                 type(self).__name__, getattr(name, "__name__", name),
                 type(self.transfer).__name__, self.fraction_train, self.min_replies,
                 self.temperature)

    def build_transfer(
        self, server_round: int, arrays: ArrayRecord, settings: ClientSettings
    ) -> ArrayRecord:
        """The ``transfer`` record: last round's soft targets and this round's transfer rows."""
        rows = self.transfer_rows(server_round, settings)
        if rows is not None:
            self._asked[server_round] = (rows, int(settings.data["num_classes"]))
        has_targets = f"{TARGETS}.probs" in arrays
        return transfer_record(
            soft_targets=arrays[f"{TARGETS}.probs"].numpy() if has_targets else None,
            target_rows=_target_rows(arrays) if has_targets else None,
            next_rows=rows,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node: the transfer record plus the settings."""
        settings = self.run_settings()
        self.fit_transfer(server_round, settings, grid, config)
        transfer = self.build_transfer(server_round, arrays, settings)
        round_config = ConfigRecord({**config, SERVER_ROUND: server_round})
        content = RecordDict({CONFIG: round_config, TRANSFER: transfer})
        nodes = self.sample(grid, server_round)
        log.debug("round %d: sending to %d node(s)", server_round, len(nodes))
        return [
            Message(content, dst_node_id=node, message_type=self.message_type,
                    group_id=str(server_round))
            for node in nodes
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop error replies, average their metrics, aggregate the rest (`aggregate_replies`)."""
        replies = sorted((r for r in replies if not r.has_error()), key=reply_order)
        self.learn_partitions(server_round, replies)
        record = self.aggregate_replies(server_round, replies)
        self.report_aggregation(server_round, len(replies))
        if record is not None:
            self.report_server_metrics(server_round)
        return record, mean_metrics(replies)

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Soft targets from the valid logits (sorted by partition id); None keeps the old ones."""
        if server_round not in self._asked:
            return None
        rows, num_classes = self._asked.pop(server_round)
        settings = self.run_settings()
        counted = settings.train.share_class_counts

        def parse(reply: Message) -> tuple:
            size, pid = teacher_facts(reply, settings)
            cap = reply_checks.example_cap(settings.data, pid)
            counts = reply_class_counts(reply, num_classes, cap) if counted else None
            return reply_logits(reply, len(rows), num_classes), size, pid, counts

        parsed = [facts for _, facts in parse_replies(server_round, replies, parse)]
        if not self.enough(server_round, len(parsed)):
            return None
        valid, sizes, pids, counts = zip(*parsed)
        meta = TeacherMeta(num_examples=np.array(sizes, dtype=np.float64),
                           partition_ids=np.array(pids, dtype=np.int64),
                           class_counts=np.stack(counts) if counted else None,
                           server_round=server_round, seed=self.seed)
        logits = np.stack(valid)
        soft = self.aggregate_logits(logits, meta)
        self.report_anomaly(server_round, logits, meta)
        return answered_record(server_round, soft, rows)

    def report_anomaly(self, server_round: int, logits: np.ndarray, meta: TeacherMeta) -> None:
        """Hand each teacher's anomaly score (`ANOMALY_SCORE`) to the sinks, whatever the
        aggregator: how far its probabilities at the strategy's temperature are from the
        robust consensus of all of them."""
        if not self.server_metric_sinks:
            return
        scores = anomaly_scores(logits, self.temperature)
        values = {client_metric(ANOMALY_SCORE, pid): float(score)
                  for pid, score in zip(meta.partition_ids, scores)}
        for sink in self.server_metric_sinks:
            sink(server_round, values)

    def enough(self, server_round: int, valid: int) -> bool:
        """Whether `valid` replies meet `min_replies` (else the previous record stays)."""
        self._valid[server_round] = valid
        if valid < self.min_replies:
            log.warning("round %d: %d valid replies < min_replies=%d; keeping the previous round's",
                        server_round, valid, self.min_replies)
            return False
        return True

    def report_aggregation(self, server_round: int, replies: int) -> None:
        """Tell the sinks how many of the round's `replies` (no error replies) were aggregated,
        rejected as malformed, and whether that was below `min_replies` (`enough` counted them;
        a round without aggregation reports nothing)."""
        if server_round not in self._valid:
            return
        valid = self._valid.pop(server_round)
        values = {VALID_REPLIES: float(valid), REJECTED_REPLIES: float(max(0, replies - valid)),
                  BELOW_MIN_REPLIES: float(valid < self.min_replies)}
        for sink in self.server_metric_sinks:
            sink(server_round, values)

    def report_server_metrics(self, server_round: int) -> None:
        """Hand what the aggregator reports about itself (e.g. privacy spent) to the sinks."""
        part = self.privacy if self.privacy is not None else self.aggregator
        report = getattr(part, "report", None)
        if report is None:
            return
        values = {key: float(value) for key, value in report().items()}
        for sink in self.server_metric_sinks:
            sink(server_round, values)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation is fused into the train reply: nothing to send."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see `configure_evaluate`)."""
        return None


def answered_record(server_round: int, soft: np.ndarray, rows: np.ndarray) -> ArrayRecord:
    """The transfer record of the rows the aggregator answered (`fedkd.aggregation.answered_rows`);
    none answered: a record without targets (the clients only revisit next round)."""
    keep = answered_rows(soft)
    if keep.all():
        return transfer_record(soft_targets=soft, target_rows=rows)
    log.info("round %d: %d of %d transfer rows answered", server_round, int(keep.sum()), len(keep))
    if not keep.any():
        return transfer_record()
    return transfer_record(soft_targets=soft[keep], target_rows=rows[keep])


def parse_replies(
    server_round: int, replies: Iterable[Message], parse: Callable[[Message], T]
) -> list[tuple[Message, T]]:
    """`parse` every reply; a reply it rejects (ValueError, KeyError, TypeError) is dropped with a
    warning naming the node, so a malformed or malicious reply never breaks the round.

    Behind a `fedkd.wire.WireGrid` with its `fedkd.reply_guard.ReplyGuard` every reply was
    checked already (the same `fedkd.reply_checks`, the same warning); this catches what only
    the strategy knows, and replies handed to a strategy directly."""
    parsed = []
    for reply in replies:
        try:
            parsed.append((reply, parse(reply)))
        except (ValueError, KeyError, TypeError) as err:
            log.warning("round %d: reply from node %s dropped: %s", server_round,
                        reply.metadata.src_node_id, err)
    return parsed


def _target_rows(arrays: ArrayRecord) -> np.ndarray:
    rows = rows_of(arrays, TARGETS)
    if rows is None:
        raise ValueError(f"the soft targets' record has no {TARGETS}.<rows>")
    return rows


def teacher_facts(reply: Message, settings: ClientSettings) -> tuple[float, int]:
    """A reply's private data size and partition id, checked as the wire checks them
    (`fedkd.reply_checks`: an int partition id of the run, a size up to what it holds)."""
    metrics = reply.content.metric_records.get(METRICS, {})
    pid = reply_checks.partition_id(metrics.get(PARTITION_ID), len(settings.assignment))
    size = reply_checks.count(metrics.get(NUM_EXAMPLES),
                              reply_checks.example_cap(settings.data, pid))
    return float(size), pid


def mean_metrics(replies: list[Message]) -> MetricRecord | None:
    """Unweighted mean of every numeric metric over the replies."""
    values: dict[str, list[float]] = {}
    for reply in replies:
        for key, value in reply.content.metric_records.get(METRICS, {}).items():
            if isinstance(value, int | float) and key != PARTITION_ID:
                values.setdefault(key, []).append(float(value))
    return MetricRecord({k: float(np.mean(v)) for k, v in values.items()}) if values else None
