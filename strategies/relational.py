"""Relational exchange (fedkd): sample-to-sample structure travels, across architectures.

Each round the sampled clients answer logits on the transfer rows, as in FedMD, and also the
cosine similarities of their tap between those rows (`fedkd.losses.relation_kd.similarity_rows`,
``[N, N - 1]``): a relation says how a model sees the rows relative to each other, in no
particular feature space, so clients of any width share it. The server aggregates the clients'
rows with the run's aggregator, as if they were logits at the relation temperature: row ``i``
becomes a distribution over the other rows (robust aggregators stay robust). It broadcasts the
result with the soft targets (``targets.relation``), and students match it with the
``relation_kd`` loss term (`fedkd.losses.relation_kd.RelationKD`), alongside the soft targets
(``kd`` weight > 0) or instead of them (``kd`` weight 0: the targets still travel). With
``propagation`` > 0 the server also smooths the soft targets along the aggregated relations
before it sends them (label propagation, `fedkd.aggregation.propagation.propagate`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedkd.aggregation import TeacherMeta
from fedkd.aggregation.propagation import propagate
from fedkd.losses.relation_kd import full_relation
from fedkd.errors import ConfigError, require_number
from fedkd.protocol import RELATION, TARGETS
from fedkd.records import reply_relation
from fedkd.settings import ClientSettings, TrainSettings
from fedkd.strategies.base import Aggregator, KDStrategy, parse_replies, teacher_facts

log = logging.getLogger(__name__)

RELATION_KEY = f"{TARGETS}.{RELATION}"


class Relational(KDStrategy):
    """FedMD plus aggregated relations; see `KDStrategy` for the other parameters.

    Parameters
    ----------
    relation_temperature : float
        tau > 0: the aggregator forms row distributions of the similarities at this temperature
        (the clients' ``relation_kd`` term must use the same).
    relation_aggregator : callable or None
        How the relations are aggregated (an aggregator's signature); None: the run's aggregator,
        which must then keep no state across calls (it is called twice a round).
    propagation : float
        ``w`` in [0, 1]: each soft target of the rows the relations cover becomes
        ``(1 - w) p + w A p``, ``A`` the aggregated relations (one step of label propagation);
        0: the soft targets as the aggregator gave them.
    """

    def __init__(self, aggregator: Aggregator | None = None, relation_temperature: float = 0.1,
                 relation_aggregator: Aggregator | None = None, propagation: float = 0.0,
                 **kwargs) -> None:
        if aggregator is None:
            raise ConfigError("strategy.flower.aggregator", None, "must be an aggregator: the "
                              "relational strategy aggregates logits and relations")
        super().__init__(aggregator=aggregator, **kwargs)
        self.relation_temperature = require_number("relation_temperature", relation_temperature,
                                                   0.0, low_open=True)
        relation_aggregator = relation_aggregator or aggregator
        if hasattr(relation_aggregator, "state_dict"):
            raise ConfigError("strategy.flower.relation_aggregator", type(relation_aggregator).__name__,
                              "keeps state across rounds; give a stateless aggregator for the "
                              "relations (e.g. mean_probs, median)")
        if self.privacy is not None:
            raise ConfigError("privacy", "client_dp", "does not cover the relations: use "
                              "strategy=fedmd with client-level DP")
        self.relation_aggregator = relation_aggregator
        self.propagation = require_number("strategy.flower.propagation", propagation, 0.0, 1.0,
                                          low_open=False, high_open=False)

    def bind(self, settings: ClientSettings) -> None:
        """As `KDStrategy.bind`, after `check_train`."""
        self.check_train(settings.train)
        super().bind(settings)

    def check_train(self, train: TrainSettings) -> None:
        """The clients must share relations, at the strategy's relation temperature."""
        if not train.relation_rows:
            raise ConfigError("distill.relation_rows", 0, "must be > 0 with strategy=relational "
                              "(the transfer rows the clients send relations between)")
        if "relation" in (train.losses or {}):
            raise ConfigError("distill.losses.relation", train.losses["relation"],
                              "matches cosine similarities, but this strategy sends row "
                              "distributions: use relation_kd")
        term = (train.losses or {}).get("relation_kd")
        if term is not None and term["temperature"] != self.relation_temperature:
            raise ConfigError("distill.losses.relation_kd.temperature", term["temperature"],
                              f"must equal strategy.flower.relation_temperature="
                              f"{self.relation_temperature}: the targets are distributions at it")
        if not uses_relation(train) and not self.propagation:
            raise ConfigError("strategy.flower.propagation", self.propagation,
                              "must be > 0 when no client term uses the relations "
                              "(distill.losses.relation_kd.weight 0 or absent): they would "
                              "travel for nothing")

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Soft targets as `KDStrategy`, plus ``targets.relation`` over the same answered rows."""
        asked = self._asked.get(server_round)
        record = super().aggregate_replies(server_round, replies)
        if record is None or asked is None or f"{TARGETS}.probs" not in record:
            return record
        rows = len(asked[0])
        settings = self.run_settings()
        head = min(rows, settings.train.relation_rows)  # the relations cover the first rows
        parsed = [facts for _, facts in parse_replies(
            server_round, replies,
            lambda r: (reply_relation(r, head, settings.train.relation_topk),
                       *teacher_facts(r, settings)))]
        if not parsed:
            return record
        relations, sizes, pids = zip(*parsed)
        meta = TeacherMeta(num_examples=np.array(sizes, dtype=np.float64),
                           partition_ids=np.array(pids, dtype=np.int64),
                           server_round=server_round, seed=self.seed)
        dist = self.relation_aggregator(np.stack(relations), meta,
                                        temperature=self.relation_temperature)
        if len(record[f"{TARGETS}.probs"].numpy()) != rows:  # an aggregator left rows out
            log.warning("round %d: the aggregator answered only some rows; no relation this "
                        "round", server_round)
            return record
        relation = relation_rows(np.nan_to_num(dist, nan=0.0))
        record[RELATION_KEY] = Array(relation)
        if self.propagation:
            probs = record[f"{TARGETS}.probs"].numpy()
            neighbours = full_relation(torch.from_numpy(relation)).numpy()
            record[f"{TARGETS}.probs"] = Array(propagate(probs, neighbours, self.propagation))
        return record

    def build_transfer(self, server_round: int, arrays: ArrayRecord,
                       settings: ClientSettings) -> ArrayRecord:
        """As `KDStrategy.build_transfer`, with last round's relation next to its targets when a
        client term uses it (with ``relation_kd`` at weight 0 only the propagated targets go)."""
        record = super().build_transfer(server_round, arrays, settings)
        if RELATION_KEY in arrays and f"{TARGETS}.probs" in record and uses_relation(settings.train):
            record[RELATION_KEY] = arrays[RELATION_KEY]
        return record


def uses_relation(train: TrainSettings) -> bool:
    """Whether the clients' loss terms use the aggregated relations (``relation_kd`` weight > 0)."""
    term = (train.losses or {}).get("relation_kd")
    return term is not None and float(term.get("weight", 0.0)) > 0.0


def relation_rows(dist: np.ndarray) -> np.ndarray:
    """``[N, N - 1]`` float32 row distributions over the other rows (a row without mass: 0)."""
    dist = np.clip(np.asarray(dist, dtype=np.float64), 0.0, None)
    sums = dist.sum(axis=1, keepdims=True)
    return np.where(sums > 0, dist / np.where(sums > 0, sums, 1.0), 0.0).astype(np.float32)
