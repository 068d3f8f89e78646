"""Flower's FedAvg, sampling partition ids instead of node ids.

Flower's `FedAvg.configure_train` samples node ids with Python's global `random`; node ids are
random per run, so with ``fraction_train < 1`` the same seed trained other partitions each run.
This subclass keeps everything of Flower's FedAvg but the sample, which is fedkd's
(`fedkd.strategies.partitions.PartitionSampling`: the free nodes of this round's seeded sample of
partition ids). Evaluation (``fraction_evaluate``) stays Flower's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedkd.client_dp import DP_NOISE_STREAM, ClientDP, dp_fedavg
from fedkd.errors import ConfigError, require_int, require_number
from fedkd.protocol import SERVER_ROUND
from fedkd.sampling import check_sampling
from fedkd.settings import ClientSettings
from fedkd.strategies.checkpointed import Nodes
from fedkd.strategies.partitions import PartitionMap, PartitionSampling

log = logging.getLogger(__name__)


class FedAvg(PartitionSampling, FlowerFedAvg):
    """Flower's FedAvg whose training sample is a seeded sample of partition ids.

    Parameters
    ----------
    seed : int
        Seeds the partition sample (with the round).
    wait_for_nodes_s : float
        Longest wait for `min_available_nodes`; then the round goes on with those connected.
    privacy : ClientDP or None
        Client-level DP (`fedkd.client_dp`, ``privacy=client_dp``): DP-FedAvg, each client's weight
        update clipped, the sum noised, uniform weights.
    **kwargs
        Flower's `FedAvg` parameters (fraction_train, min_train_nodes, min_available_nodes, ...).
    """

    def __init__(self, seed: int = 0, wait_for_nodes_s: float = 60.0, privacy: ClientDP | None = None,
                 **kwargs) -> None:
        if privacy is not None and not isinstance(privacy, ClientDP):
            raise ConfigError("privacy", privacy, "must be a fedkd.client_dp.ClientDP or null")
        check_sampling(kwargs.get("fraction_train", 1.0), kwargs.get("min_train_nodes", 2),
                       kwargs.get("min_available_nodes", 2), seed, wait_for_nodes_s)
        require_number("fraction_evaluate", kwargs.get("fraction_evaluate", 1.0), 0.0, 1.0)
        require_int("min_evaluate_nodes", kwargs.get("min_evaluate_nodes", 2), 0)
        super().__init__(**kwargs)
        self.seed = seed
        self.wait_for_nodes_s = wait_for_nodes_s
        self.partitions = PartitionMap()
        self.settings: ClientSettings | None = None
        self.privacy = privacy
        self.server_metric_sinks: list[Callable[[int, dict[str, float]], None]] = []
        self._global: dict[int, ArrayRecord] = {}  # round -> the weights sent (DP updates are relative)

    def bind(self, settings: ClientSettings) -> None:
        """Tell the strategy which run it drives (its number of partitions)."""
        self.settings = settings

    def state_dict(self, nodes: Nodes) -> dict[str, Any]:
        """What carries over between rounds besides the weights: the partition map (by partition;
        Flower's FedAvg keeps nothing else)."""
        state = self.partition_state(nodes)
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], nodes: Nodes) -> None:
        """Inverse of `state_dict`."""
        self.load_partition_state(state, nodes)
        if "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's train messages, to the nodes of this round's partition sample."""
        if self.fraction_train == 0.0:
            return []
        node_ids = self.sample(grid, server_round)
        log.info("configure_train: sampled %d node(s)", len(node_ids))
        config[SERVER_ROUND] = server_round
        if self.privacy is not None:
            self._global[server_round] = arrays
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg aggregation; the replies' ``partition-id`` refresh the partition map."""
        replies = list(replies)
        self.learn_partitions(server_round, replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.privacy is None or arrays is None:
            return arrays, metrics
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        global_state = _numpy_state(self._global.pop(server_round))
        clients = [_numpy_state(next(iter(r.content.array_records.values()))) for r in valid]
        rng = np.random.default_rng([self.seed, server_round, DP_NOISE_STREAM])
        new = dp_fedavg(global_state, clients, self.privacy, rng)
        self.privacy.spend(self.fraction_train)
        values = {key: float(value) for key, value in self.privacy.report().items()}
        for sink in self.server_metric_sinks:
            sink(server_round, values)
        return ArrayRecord(array_dict={key: Array(value) for key, value in new.items()}), metrics


def _numpy_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}
