"""FedProto-style prototype exchange (Tan et al., AAAI 2022), across architectures.

Each round the sampled clients send, besides their logits (when the run exchanges any), the mean
of their tap per class over their private rows, projected to a shared width P by a fixed seeded
projection (`fedkd.losses.relation.fixed_projection`: every client of an architecture projects
alike, and architectures of any width meet in the same P dimensions), and how many rows each
mean covers. The server averages each class's prototypes weighted by those counts and broadcasts
them (``prototypes``, ``prototype-counts``); students pull their projected tap toward the
prototype of each private row's label (the ``prototype`` loss term, in the revisit and the
digest's private rows). With ``aggregator: null`` only prototypes travel (FedProto alone);
with an aggregator the soft targets travel too (FedMD plus prototypes).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedkd import reply_checks
from fedkd.errors import ConfigError
from fedkd.protocol import PROTOTYPE_COUNTS, PROTOTYPES
from fedkd.records import reply_prototypes, transfer_record
from fedkd.settings import ClientSettings, TrainSettings
from fedkd.strategies.base import Aggregator, KDStrategy, parse_replies, teacher_facts


def mean_prototypes(protos: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Count-weighted mean per class: ``[K, C, P]`` prototypes and ``[K, C]`` counts ->
    ``[C, P]`` (0 for a class nobody holds) and the total counts ``[C]``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=0)
    sums = np.einsum("kc,kcp->cp", counts, np.asarray(protos, dtype=np.float64))
    means = np.where(total[:, None] > 0, sums / np.where(total > 0, total, 1.0)[:, None], 0.0)
    return means.astype(np.float32), total.astype(np.int64)


class FedProto(KDStrategy):
    """Prototype exchange, with or without logits; see `KDStrategy` for the parameters
    (``aggregator=None``: prototypes only)."""

    def __init__(self, aggregator: Aggregator | None = None, **kwargs) -> None:
        super().__init__(aggregator=aggregator, **kwargs)
        if self.privacy is not None:
            raise ConfigError("privacy", "client_dp", "does not cover the prototypes: use "
                              "strategy=fedmd with client-level DP")

    def bind(self, settings: ClientSettings) -> None:
        """As `KDStrategy.bind`, after `check_train`."""
        self.check_train(settings.train)
        super().bind(settings)

    def check_train(self, train: TrainSettings) -> None:
        """The clients must send prototypes."""
        if not train.prototype_dim:
            raise ConfigError("distill.prototype_dim", 0, "must be > 0 with strategy=fedproto "
                              "(the width the clients' prototypes are projected to)")

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Soft targets as `KDStrategy` (with an aggregator), plus the mean prototypes."""
        record = super().aggregate_replies(server_round, replies)
        if record is None and self.aggregator is not None:
            return None  # too few valid replies: last round's targets and prototypes stay
        settings = self.run_settings()
        classes, dim = int(settings.data["num_classes"]), settings.train.prototype_dim

        def parse(reply: Message) -> tuple:
            _, pid = teacher_facts(reply, settings)
            cap = reply_checks.example_cap(settings.data, pid)
            return reply_prototypes(reply, classes, dim, cap)

        parsed = [facts for _, facts in parse_replies(server_round, replies, parse)]
        if len(parsed) < self.min_replies:
            return record
        protos, counts = zip(*parsed)
        means, total = mean_prototypes(np.stack(protos), np.stack(counts))
        record = record if record is not None else transfer_record()
        record[PROTOTYPES], record[PROTOTYPE_COUNTS] = Array(means), Array(total)
        return record

    def build_transfer(self, server_round: int, arrays: ArrayRecord,
                       settings: ClientSettings) -> ArrayRecord:
        """As `KDStrategy.build_transfer`, with last round's prototypes."""
        record = super().build_transfer(server_round, arrays, settings)
        for key in (PROTOTYPES, PROTOTYPE_COUNTS):
            if key in arrays:
                record[key] = arrays[key]
        return record
