"""Test helpers shared by several test modules (no fixtures here: see conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

from fedkd.settings import ClientSettings
from tests.conftest import reply

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from fedkd.server import PreparedRun

S = TypeVar("S")


def bound(strategy: S, settings: ClientSettings) -> S:
    """`strategy` bound to the run `settings` describe (as `run_strategy` does), for chaining."""
    strategy.bind(settings)
    return strategy


class FakeGrid(Grid):
    """In-memory grid: nodes answer at once unless listed in `silent`.

    `answer(message)` builds a node's reply (default: metrics with the node id as partition id);
    `pushed` keeps every message sent, in order. Its own `send_and_receive` refuses to run: wrap it
    in `fedkd.wire.WireGrid`, as the ServerApp does, to drive whole rounds.
    """

    def __init__(self, nodes: list[int], answer: Callable[[Message], Message] | None = None) -> None:
        self.nodes = nodes
        self.silent: set[int] = set()
        self.answer = answer or (lambda m: reply(m, partition_id=m.metadata.dst_node_id))
        self.inbox: dict[str, Message] = {}
        self.outbox: dict[str, Message] = {}
        self.pushed: list[Message] = []

    def set_run(self, run): ...
    @property
    def run(self): ...
    def create_message(self, *a, **k): ...
    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"id{len(self.pushed)}"
            self.pushed.append(m)
            self.inbox[m.metadata.message_id] = m
            ids.append(m.metadata.message_id)
        return ids

    def deliver(self) -> None:
        """Nodes that are not silent answer everything in their inbox."""
        for mid, m in list(self.inbox.items()):
            if m.metadata.dst_node_id not in self.silent:
                self.outbox[mid] = self.answer(self.inbox.pop(mid))

    def pull_messages(self, message_ids):
        self.deliver()
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("WireGrid must use its own loop")


def run_plain(run: PreparedRun | DictConfig) -> dict[int, dict[int, float]]:
    """The plain-PyTorch oracle: test accuracy per round and partition id of the reference loop
    (`benchmarks.plain_loop`, no Flower) on a prepared run, or on a config it prepares first.

    The one place tests reach into the benchmarks; a simulation must match these numbers.
    """
    from benchmarks.plain_loop import run_plain as reference
    from fedkd.server import PreparedRun, prepare_run

    return reference(run if isinstance(run, PreparedRun) else prepare_run(run))
