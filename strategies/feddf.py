"""FedDF (Lin et al. 2020): average weights per architecture, then distil the ensemble into each.

Clients upload their full weights (message type ``train``, handled by the ClientApp's parameter
exchange handler). Flower's `Strategy.start` runs the round loop; FedDF fills its hooks:

- `configure_train` sends each sampled node the global model of its architecture. In round 1 the
  server knows no node's architecture (node ids are random; the partition id arrives in the reply),
  so it sends no weights: every client trains its own model with its warm-up budget. Later, a
  node's architecture follows from the partition id it reported (`KDStrategy.partitions`: its
  ``query.whoami`` answer with ``fraction_train < 1``, else its last reply).
- `aggregate_train` checks each reply's weights against its architecture, averages them within
  each architecture (weighted by the number of private examples), forms soft targets from the
  ensemble of all K client models on the public set (the configured aggregator), and distils them
  into every architecture's average (KD, no labels). The result is one ArrayRecord with keys
  ``"<arch>/<state-dict key>"`` that `start` hands to the next round.
- `configure_evaluate` sends each known node its architecture's distilled model; the ClientApp's
  ``evaluate`` handler reports test accuracy per partition.

Clients with the role ``teacher`` (``model.roles``) are never taught: they get no global weights,
their models join the ensemble but not the averages, and they are evaluated on their own upload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedkd.aggregation import TeacherMeta, answered_rows, mean_logits
from fedkd.settings import ClientSettings
from fedkd.data import load_public
from fedkd.errors import ConfigError, require_int, require_number
from fedkd.generators import LogitGuided, ModelGuided
from fedkd.generators.base import models_query
from fedkd.ensemble_distill import feature_distill, server_loss_spec
from fedkd.models import build_model
from fedkd.models.build import spec_tap
from fedkd.protocol import ARRAYS, CONFIG, SERVER_ROUND, rows_to_inputs
from fedkd.records import array_record_from_state, array_record_state, reply_class_counts
from fedkd.server_distill import (
    StateDict, average_states, checked_state, distill, join_models, kd_divergence, split_models,
    teacher_logits,
)
from fedkd.strategies.base import (
    Aggregator, KDStrategy, free_nodes, mean_metrics, parse_replies, teacher_facts,
)
from fedkd.strategies.checkpointed import Nodes

log = logging.getLogger(__name__)

"""Record name of the weights in requests and replies (Flower's parameter-exchange convention)."""


@dataclass
class Teacher:
    """One valid reply: the client's architecture, facts and trained model."""

    arch: str
    partition_id: int
    num_examples: float
    state: StateDict
    model: nn.Module
    class_counts: np.ndarray | None = None


class FedDF(KDStrategy):
    """Ensemble distillation for model fusion, with heterogeneous architectures.

    Parameters
    ----------
    aggregator : callable
        ``f(logits [K, N, C], meta, temperature=T) -> soft targets [N, C]`` over all K client models.
    server_epochs : int
        Passes over the transfer rows when distilling into each architecture's average.
    server_lr : float
        Learning rate of the server's Adam optimizer (a fresh one per architecture and round).
    server_batch_size : int or None
        Mini-batch size of server distillation; None uses the clients' ``distill.batch_size``.
    **kwargs
        `KDStrategy`'s parameters: fraction_train, min_train_nodes, min_available_nodes,
        min_replies, transfer_size (public rows distilled on per round; None = all), temperature
        (of the soft targets and the server's KD loss), seed (sampling, transfer rows and server
        distillation, with the round), wait_for_nodes_s.
    """

    holds_models = True

    def __init__(
        self,
        aggregator: Aggregator | None = mean_logits,
        server_epochs: int = 5,
        server_lr: float = 1e-3,
        server_batch_size: int | None = None,
        server_losses: Mapping[str, Any] | None = None,
        **kwargs,
    ) -> None:
        if aggregator is None:
            raise ConfigError("aggregator", None, "FedDF needs an aggregator to form the "
                                                  "ensemble's soft targets")
        require_int("server_epochs", server_epochs, 0)
        require_number("server_lr", server_lr, 0.0, low_open=True)
        require_int("server_batch_size", server_batch_size, 1, null=True)
        super().__init__(aggregator=aggregator, **kwargs)
        self.server_epochs = server_epochs
        self.server_lr = server_lr
        self.server_batch_size = server_batch_size
        self.server_losses = None if server_losses is None else server_loss_spec(
            server_losses, self.temperature)
        self._models: dict[str, StateDict] = {}  # architecture -> distilled global model
        self._own: dict[int, ArrayRecord] = {}  # teacher node id -> its last upload (evaluation)
        self._public: torch.Tensor | None = None

    def summary(self) -> None:
        """Log the strategy's settings."""
        super().summary()
        log.info("FedDF server distillation: epochs=%d lr=%s batch=%s", self.server_epochs,
                 self.server_lr, self.server_batch_size or "distill.batch_size")

    def state_dict(self, nodes: Nodes) -> dict[str, Any]:
        """`KDStrategy.state_dict` plus the distilled models and the teachers' last uploads (by
        partition)."""
        return {**super().state_dict(nodes), "models": dict(self._models),
                "own": {p: array_record_state(r) for p, r in nodes.to_partitions(self._own).items()}}

    def load_state_dict(self, state: dict[str, Any], nodes: Nodes) -> None:
        """Inverse of `state_dict`."""
        super().load_state_dict(state, nodes)
        self._models = dict(state["models"])
        self._own = {n: array_record_from_state(r) for n, r in nodes.to_nodes(state["own"]).items()}

    def model_for(self, node_id: int, models: dict[str, ArrayRecord]) -> ArrayRecord | None:
        """The global model a node gets: its architecture's if known (a teacher: None)."""
        pid = self.partitions.by_node.get(node_id)  # from whoami answers and earlier replies
        if pid is None or self.settings is None or self.settings.role_of(pid) == "teacher":
            return None
        return models.get(self.settings.arch_of(pid)[0])

    # --- Flower hooks -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One ``train`` message per sampled node, with its architecture's model when known."""
        models = split_models(arrays)
        nodes = self.sample(grid, server_round)
        messages = self._per_node(server_round, config, nodes, "train",
                                  lambda node: self.model_for(node, models), require_model=False)
        log.debug("round %d: %d node(s), %d with weights", server_round, len(messages),
                  sum(ARRAYS in m.content for m in messages))
        return messages

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Check the weights, average them per architecture, distil the ensemble into each."""
        if self.settings is None:
            return None
        teachers = []
        for reply, teacher in parse_replies(server_round, replies,
                                            lambda r: self._teacher(r, self.settings)):
            if self.settings.role_of(teacher.partition_id) == "teacher":
                self._own[reply.metadata.src_node_id] = reply.content[ARRAYS]
            teachers.append(teacher)
        if not self.enough(server_round, len(teachers)):
            return None
        losses = self._fuse(server_round, teachers)
        for sink in self.server_metric_sinks:
            sink(server_round, losses)
        return join_models(self._models)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each known, free node gets its architecture's distilled model (when evaluation is due)."""
        settings = self.run_settings()
        every = settings.train.eval_every
        if server_round % every and server_round < settings.num_rounds:
            return []
        nodes = free_nodes(grid, grid.get_node_ids())
        models = split_models(arrays)
        return self._per_node(server_round, config, nodes, "evaluate",
                              lambda node: self.model_for(node, models) or self._own.get(node),
                              require_model=True)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Unweighted mean of the reported metrics (test accuracy and loss)."""
        return mean_metrics([r for r in replies if not r.has_error()])

    # --- the pieces ---------------------------------------------------------------------------
    def _per_node(self, server_round: int, config: ConfigRecord, nodes: list[int], message_type: str,
                  model_of: Callable[[int], ArrayRecord | None], require_model: bool) -> list[Message]:
        """Messages carrying the config and the node's model where it has one."""
        round_config = ConfigRecord({**config, SERVER_ROUND: server_round})
        messages = []
        for node in nodes:
            content = RecordDict({CONFIG: round_config})
            model = model_of(node)
            if model is not None:
                content[ARRAYS] = model
            elif require_model:
                continue
            messages.append(Message(content, dst_node_id=node, message_type=message_type,
                                    group_id=str(server_round)))
        return messages

    def _build(self, arch: str, settings: ClientSettings) -> nn.Module:
        data = settings.data
        return build_model(settings.archs[arch], tuple(data["input_shape"]), int(data["num_classes"]))

    def _teacher(self, reply: Message, settings: ClientSettings) -> Teacher:
        """A reply's architecture, size and weights, checked (a reply may be malicious)."""
        size, pid = teacher_facts(reply, settings)
        arch, _ = settings.arch_of(pid)
        if ARRAYS not in reply.content.array_records:
            raise ValueError("reply carries no arrays")
        model = self._build(arch, settings)
        state = checked_state(reply.content[ARRAYS], model.state_dict())
        model.load_state_dict(state)
        counts = (reply_class_counts(reply, int(settings.data["num_classes"]))
                  if settings.train.share_class_counts else None)
        return Teacher(arch=arch, partition_id=pid, num_examples=size, state=state, model=model,
                       class_counts=counts)

    def _transfer_x(self, server_round: int, settings: ClientSettings) -> torch.Tensor:
        """The inputs to distil on this round: the transfer source's public rows (all unless
        `transfer_size` is set) or synthetic inputs."""
        if self._public is None:
            public = load_public(str(settings.data["cache_dir"]))
            self._public = torch.from_numpy(np.asarray(public, dtype=np.float32))
        return rows_to_inputs(self.transfer_rows(server_round, settings), self._public)

    def _fuse(self, server_round: int, teachers: list[Teacher]) -> dict[str, float]:
        """Average per architecture, fit a generator source, distil the ensemble into each
        average; return the KD losses before/after (and the generator's metrics)."""
        settings = self.settings
        assert settings is not None
        students = [t for t in teachers if settings.role_of(t.partition_id) == "student"]
        averages, sizes = {}, {}
        for arch in sorted({t.arch for t in students}):
            group = [t for t in students if t.arch == arch]
            averages[arch], sizes[arch] = self._build(arch, settings), len(group)
            averages[arch].load_state_dict(average_states([t.state for t in group],
                                                          [t.num_examples for t in group]))
        metrics = self._fit_transfer(server_round, settings, teachers, list(averages.values()))
        x = self._transfer_x(server_round, settings)
        meta = TeacherMeta(num_examples=np.array([t.num_examples for t in teachers]),
                           partition_ids=np.array([t.partition_id for t in teachers]),
                           class_counts=(np.stack([t.class_counts for t in teachers])
                                         if settings.train.share_class_counts else None),
                           server_round=server_round, seed=self.seed)
        logits = teacher_logits([t.model for t in teachers], x)
        soft = self.aggregate_logits(logits, meta)
        keep = answered_rows(soft)  # rows an aggregator leaves unanswered are no transfer rows
        x, soft = x[torch.from_numpy(keep)], torch.from_numpy(soft[keep])
        before, after = [], []
        for arch, student in averages.items():
            if len(x):  # no row answered: the average alone
                before.append(kd_divergence(student, x, soft, self.temperature))
                self._distill(arch, student, x, soft, teachers, server_round)
                after.append(kd_divergence(student, x, soft, self.temperature))
                log.info("round %d: %s <- average of %d, ensemble of %d: KD %.3f -> %.3f", server_round,
                         arch, sizes[arch], len(teachers), before[-1], after[-1])
            self._models[arch] = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if before:
            metrics.update({"server-kd-before": float(np.mean(before)),
                            "server-kd-after": float(np.mean(after))})
        return metrics

    def _distill(self, arch: str, student: nn.Module, x: torch.Tensor, soft: torch.Tensor,
                 teachers: list[Teacher], server_round: int) -> None:
        """Distil the ensemble into `student`: soft targets alone, or with the feature and
        relation terms of ``server_losses`` against every teacher's tap
        (`fedkd.ensemble_distill`)."""
        settings = self.run_settings()
        common = dict(temperature=self.temperature, epochs=self.server_epochs, lr=self.server_lr,
                      batch_size=self.server_batch_size or settings.train.batch_size,
                      seed=(self.seed, server_round, list(settings.archs).index(arch)))
        if self.server_losses is None:
            distill(student, x, soft, **common)
            return
        feature_distill(student, x, soft, spec=self.server_losses,
                        student_tap=spec_tap(settings.archs[arch]),
                        teachers=[t.model for t in teachers],
                        teacher_tap_names=[spec_tap(settings.archs[t.arch]) for t in teachers],
                        **common)

    def _fit_transfer(self, server_round: int, settings: ClientSettings, teachers: list[Teacher],
                      students: list[nn.Module]) -> dict[str, float]:
        """Fit a generator source on the uploaded models (white-box), or on their logits alone
        (black-box, answered here since the server holds the models); other sources: nothing."""
        models = [t.model for t in teachers]
        if isinstance(self.transfer, ModelGuided):
            return self.transfer.fit_models(server_round, settings, models, students)
        if isinstance(self.transfer, LogitGuided):
            return self.transfer.fit_logits(server_round, settings, models_query(models))
        return {}

