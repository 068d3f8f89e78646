"""Checkpoints every N rounds, and resuming from one: `Checkpointed` wraps a strategy.

Flower's `Strategy.start` runs the round loop (rounds 1..num_rounds, with no first-round
option); this wrapper fills its hooks by handing them to the wrapped strategy, and

- every `CheckpointPlan.every` rounds, once the round is over (after `aggregate_evaluate`),
  writes one file, ``checkpoint.pt``: the round, the ArrayRecord the loop hands to the next
  round, the server's RNG states (``random``, numpy's global RNG, torch's CPU RNG), the
  strategy's own state (`state_dict`) and that of the plan's other parts (the results recorder,
  every client's ``Context.state``, the reply guard). It is written to a temporary file in the
  same folder, flushed to disk, then renamed over the old one (`save_atomic`): a crash mid-write
  leaves the previous checkpoint whole. A round whose nodes still owe replies (stragglers) is
  not checkpointed: their state changes after the round ended;
- resuming (`CheckpointPlan.resume`: a checkpoint of round k), restores all of it before the
  loop starts and lets rounds 1..k pass without a message (every hook returns nothing), so
  round k+1 starts from exactly where the checkpointed run was.

Flower's node ids are drawn afresh in every run, so whatever is kept per node is written per
partition (the partition the engine gave the node) and read back onto the node that holds that
partition now (`Nodes`). Checkpoints hold tensors and plain values only and are read back with
``torch.load(weights_only=True)``: records are kept as raw bytes (`fedkd.records`), never pickled.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd.atomic import save_atomic
from fedkd.errors import ConfigError
from fedkd.records import array_record_from_state, array_record_state

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT = "checkpoint.pt"
"""The checkpoint's file name in the run folder."""
FORMAT = 1
"""Version of the checkpoint's layout; a checkpoint of another version is refused."""


@dataclass(frozen=True)
class Nodes:
    """Which node holds which partition in this run (Flower draws node ids afresh every run).

    Parameters
    ----------
    partition_of : mapping of int to int
        Node id -> partition id, as the engine assigned them.
    """

    partition_of: Mapping[int, int]

    def to_partitions(self, by_node: Mapping[int, T]) -> dict[int, T]:
        """`by_node` keyed by the partition each node holds (nodes the engine does not know are
        left out)."""
        return {self.partition_of[n]: v for n, v in by_node.items() if n in self.partition_of}

    def to_nodes(self, by_partition: Mapping[int, T]) -> dict[int, T]:
        """Inverse of `to_partitions`, onto this run's nodes (partitions no node holds are left
        out)."""
        node_of = {p: n for n, p in self.partition_of.items()}
        return {node_of[p]: v for p, v in by_partition.items() if p in node_of}


class Stateful(Protocol):
    """A part of a run whose state a checkpoint keeps (tensors and plain values only)."""

    def state_dict(self, nodes: Nodes) -> dict[str, Any]:
        """The state, with node ids turned into partition ids (`Nodes.to_partitions`)."""

    def load_state_dict(self, state: dict[str, Any], nodes: Nodes) -> None:
        """Restore what `state_dict` returned, onto this run's nodes (`Nodes.to_nodes`)."""


@dataclass
class CheckpointPlan:
    """Where and how often a run checkpoints, what it keeps, and what it resumes from.

    Parameters
    ----------
    path : Path
        The checkpoint file (``<run folder>/checkpoint.pt``).
    every : int
        Checkpoint after every `every`-th round (not after the last); 0: never.
    nodes : callable
        This run's `Nodes` (it may wait for the engine to register them).
    parts : dict of str to Stateful
        Parts kept besides the strategy, the loop's arrays and the RNGs, by name.
    resume : dict or None
        A checkpoint (`load_checkpoint`) to continue from.
    meta : dict
        Facts written into every checkpoint (e.g. the partition hash), checked when resuming.
    """

    path: Path
    every: int
    nodes: Callable[[], Nodes]
    parts: dict[str, Stateful] = field(default_factory=dict)
    resume: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Checkpointed(Strategy):
    """`inner` under Flower's round loop, checkpointed every `plan.every` rounds, resumed from
    `plan.resume` when given. See the module's docstring.

    Parameters
    ----------
    inner : Strategy
        The run's strategy; it keeps its state through ``state_dict(nodes)`` and
        ``load_state_dict(state, nodes)``.
    plan : CheckpointPlan
        Where, how often, what else, and what to resume from.
    """

    def __init__(self, inner: Strategy, plan: CheckpointPlan) -> None:
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(inner, method, None)):
                raise ConfigError(f"strategy {type(inner).__name__} cannot be checkpointed (it has "
                                  f"no {method}): set simulation.checkpoint_every=0")
        self.inner, self.plan = inner, plan
        self.done = 0  # rounds restored from the checkpoint: the loop passes over them
        self.arrays = ArrayRecord()  # what the loop hands to the next round
        self.num_rounds = 0
        self._grid: Grid | None = None

    def summary(self) -> None:
        """The wrapped strategy's summary."""
        self.inner.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, *args: Any, **kwargs: Any) -> Any:
        """Restore the checkpoint (if resuming), then Flower's round loop over the hooks below."""
        if hasattr(self.inner, "round_timeout_s"):  # what PartitionSampling.start remembers
            self.inner.round_timeout_s = float(timeout)
        self.num_rounds, self.arrays, self._grid = int(num_rounds), initial_arrays, grid
        if self.plan.resume is not None:
            self.restore(self.plan.resume)
        return super().start(grid, self.arrays, num_rounds, timeout, *args, **kwargs)

    # --- Flower hooks: nothing for restored rounds, the wrapped strategy's otherwise ----------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's train messages; none for a restored round."""
        if server_round <= self.done:
            return []
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregate (kept for the checkpoint); nothing for a restored round."""
        if server_round <= self.done:
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's evaluate messages; none for a restored round."""
        if server_round <= self.done:
            return []
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """The wrapped strategy's evaluation metrics; then the round is over: checkpoint it
        when due."""
        if server_round <= self.done:
            return None
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        every = self.plan.every
        if every and server_round % every == 0 and server_round < self.num_rounds:
            self.checkpoint(server_round)
        return metrics

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint(self, server_round: int) -> bool:
        """Write the checkpoint of `server_round` (just finished); False if nodes still owe
        replies (their state is not final: the previous checkpoint stays)."""
        busy = self._grid.busy_node_ids() if hasattr(self._grid, "busy_node_ids") else set()
        if busy:
            log.warning("round %d: not checkpointed: %d node(s) still owe replies", server_round,
                        len(busy))
            return False
        start, nodes = time.monotonic(), self.plan.nodes()
        state = {
            "format": FORMAT,
            "round": int(server_round),
            "meta": dict(self.plan.meta),
            "arrays": array_record_state(self.arrays),
            "rng": rng_state(),
            "strategy": self.inner.state_dict(nodes),
            "parts": {name: part.state_dict(nodes) for name, part in self.plan.parts.items()},
        }
        save_atomic(state, self.plan.path)
        log.info("checkpoint: round %d -> %s (%.1f MB, %.2f s)", server_round, self.plan.path,
                 self.plan.path.stat().st_size / 2**20, time.monotonic() - start)
        return True

    def restore(self, state: dict[str, Any]) -> None:
        """Put the run back where `state` (a checkpoint) left it; rounds up to its round pass."""
        nodes = self.plan.nodes()
        for name, part in self.plan.parts.items():
            part.load_state_dict(state["parts"][name], nodes)
        self.inner.load_state_dict(state["strategy"], nodes)
        self.arrays = array_record_from_state(state["arrays"])
        self.done = int(state["round"])
        set_rng_state(state["rng"])  # last: nothing above may draw from them
        log.info("resuming after round %d of %d", self.done, self.num_rounds)


def rng_state() -> dict[str, Any]:
    """The server process's global RNG states: Python's, numpy's legacy one, torch's CPU one."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": [int(v) for v in numpy_state["state"]["key"]],
                            "pos": int(numpy_state["state"]["pos"])}
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": np.array(numpy_state["state"]["key"], dtype=np.uint32),
                            "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `Checkpointed` (tensors and plain values only: ``weights_only``)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file is named, with torch's reason
        raise ConfigError(f"checkpoint {path} cannot be read: {err}".splitlines()[0]) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} is not a fedkd checkpoint of format {FORMAT}")
    return state
