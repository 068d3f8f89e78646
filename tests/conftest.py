"""Shared fixtures: Flower message factories and a small prepared run on digits."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkd.server import PreparedRun, compose_config, prepare_run

SMALL = ["num_clients=4", "num_rounds=3", "distill.warmup_epochs=5", "model=hetero"]
"""The default config shrunk; `model=hetero` keeps two model families (a CNN and an MLP) in play."""
_ids = itertools.count(1)

os.environ.setdefault("FEDKD_DEVICE", "cpu")  # pinned numbers are CPU numbers, on a GPU machine too
# (Ray's workers inherit it); GPU tests pass device= explicitly (docs/gpu.md)


@pytest.fixture
def flower_ids() -> Iterator[None]:
    """Let tests build Messages outside a running app (Flower needs a task identity)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def request(content: RecordDict, dst: int, server_round: int = 1,
            message_type: str = "train.distill") -> Message:
    """A server -> node message with a message id, as if pushed."""
    TaskIdentity.node_id = 1
    msg = Message(content, dst_node_id=dst, message_type=message_type, group_id=str(server_round))
    msg.metadata.__dict__["_message_id"] = f"m{next(_ids)}"
    return msg


def reply(to: Message, *, logits: np.ndarray | None = None, partition_id: int | None = None,
          num_examples: int = 10, error: str | None = None, **metrics: float) -> Message:
    """A node's reply to `to`, carrying logits and metrics, or an error."""
    TaskIdentity.node_id = to.metadata.dst_node_id
    try:
        if error is not None:
            return Message(Error(code=2, reason=error), reply_to=to)
        content = RecordDict()
        if logits is not None:
            content["logits"] = ArrayRecord({"logits": Array(np.asarray(logits))})
        values = {"num-examples": num_examples, **metrics}
        if partition_id is not None:
            values["partition-id"] = partition_id
        content["metrics"] = MetricRecord(values)
        return Message(content, reply_to=to)
    finally:
        TaskIdentity.node_id = 1


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> PreparedRun:
    """The default config shrunk to 4 clients and 3 rounds, data prepared once per session."""
    cache = tmp_path_factory.mktemp("cache")
    return prepare_run(compose_config([*SMALL, f"simulation.cache_dir={cache}"]))
