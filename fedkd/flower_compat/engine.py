"""The simulation engine: its node contexts, and its dispatcher and queues (`fedkd.flower_compat`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from fedkd.flower_compat.gate import SUPPORTED_FLOWER, _shape_error, require_supported_flower

log = logging.getLogger("fedkd.flower_compat")

VCE_API = "flwr.server.superlink.fleet.vce.vce_api"
SWEEP_S = 0.02
"""Seconds between two sweeps of the simulation's dispatcher (`one_pass_dispatch`)."""
STOP_POLL_S = 0.05
"""Longest wait of the simulation engine's queue reads (`PromptQueue`)."""


class SimulationNodes:
    """The nodes of the next simulation `run_simulation` starts in this process, and the
    ``Context`` Flower's engine keeps for each (its ``state`` is the client's state).

    Flower 1.42 keeps every simulated node's Context in the engine's node stores (one
    ``DeprecatedRunInfoStore`` per node, made by ``_register_node_info_stores`` in
    ``flwr.server.superlink.fleet.vce.vce_api``) and offers no public way to read or seed them:
    `capture_simulation_nodes` wraps that function while a simulation starts, so the stores it
    makes land here. The engine replaces a node's Context after each message it handles; between
    rounds (no message in flight) they are final and may be read or replaced from the
    ServerApp's thread.
    """

    def __init__(self) -> None:
        import threading

        self._stores: dict[int, Any] = {}
        self._run_id: int | None = None
        self._ready = threading.Event()

    def _capture(self, stores: dict[int, Any], run_id: int) -> None:
        self._stores, self._run_id = stores, run_id
        self._ready.set()

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the engine has registered its nodes (it starts after the ServerApp)."""
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the simulation engine registered no nodes within {timeout:.0f} s")

    def partition_of(self) -> dict[int, int]:
        """Node id -> the partition id in its node config."""
        self.wait()
        return {node: int(store.node_config["partition-id"]) for node, store in self._stores.items()}

    def known(self, timeout: float = 10.0) -> dict[int, int]:
        """`partition_of` once the engine has registered its nodes' stores, else empty.

        Flower's engine registers the nodes in its state first and their stores right after
        (``_register_nodes``, then ``_register_node_info_stores``): a ServerApp that saw the
        nodes may ask between the two, so this waits up to `timeout` s. Without the wait a
        1,000-node run sometimes asked every node ``query.whoami`` first (1,000 messages) because
        it asked a few milliseconds too early."""
        return self.partition_of() if self._ready.wait(timeout) else {}

    def states(self) -> dict[int, Any]:
        """Partition id -> that node's ``Context.state`` (a RecordDict; do not change it)."""
        self.wait()
        return {int(store.node_config["partition-id"]): store.retrieve_context(self._run_id).state
                for store in self._stores.values()}

    def set_states(self, states: dict[int, Any]) -> None:
        """Replace the ``Context.state`` of the node holding each partition of `states` (before
        its first message)."""
        self.wait()
        for store in self._stores.values():
            partition = int(store.node_config["partition-id"])
            if partition in states:
                store.retrieve_context(self._run_id).state = states[partition]


@contextmanager
def capture_simulation_nodes(nodes: SimulationNodes | None = None) -> Iterator[SimulationNodes]:
    """While inside, the next simulation started in this process hands its nodes' stores to
    `nodes` (a new `SimulationNodes` if None), which is yielded."""
    require_supported_flower()
    from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "_register_node_info_stores", None)
    if original is None or not hasattr(DeprecatedRunInfoStore, "retrieve_context"):
        raise RuntimeError(
            "flwr's simulation engine has no _register_node_info_stores (or node stores without "
            f"retrieve_context) any more: fedkd checkpoints simulated clients on flwr "
            f"{SUPPORTED_FLOWER}.x only (set simulation.checkpoint_every=0)")
    nodes = SimulationNodes() if nodes is None else nodes

    @functools.wraps(original)
    def register(nodes_mapping: Any, run: Any, *args: Any, **kwargs: Any) -> dict[int, Any]:
        stores = original(nodes_mapping, run, *args, **kwargs)
        nodes._capture(stores, run.run_id)
        return stores

    vce_api._register_node_info_stores = register
    try:
        yield nodes
    finally:
        vce_api._register_node_info_stores = original


# --- the simulation's message dispatcher ------------------------------------------------------


def first_undelivered(state: Any, order: dict[int, int]) -> list[Any]:
    """Each node's first undelivered message (store order), in `order`, marked delivered: what
    one sweep of Flower's ``add_messages_to_queue`` hands out, with one check per message."""
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))  # expiry and federation, once per message
        picked: dict[int, Any] = {}
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            node = msg.metadata.dst_node_id
            if node in order and node not in picked:
                picked[node] = msg
    out = sorted(picked.values(), key=lambda m: order[m.metadata.dst_node_id])
    delivered_at = now().isoformat()
    for msg in out:
        msg.metadata.delivered_at = delivered_at
    return out


def _add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int],
                           f_stop: Any) -> None:
    """Drop-in for Flower's ``add_messages_to_queue``: one pass over the store per sweep, every
    `SWEEP_S` (Flower: 0.1 s, which a pushed wave waited half of on average)."""
    order = {node: i for i, node in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        for msg in first_undelivered(state, order):
            queue.put(msg)
        f_stop.wait(SWEEP_S)


class PromptQueue(Queue):
    """`queue.Queue` whose timed ``get`` waits at most `STOP_POLL_S` at a time.

    Flower's engine threads (``worker``, ``put_message_into_state``) call ``get(timeout=1.0)``
    in a loop that looks at the stop event in between; a shorter wait lets them see it sooner.
    A ``get`` that times out raises ``Empty`` as before: the callers loop."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:  # noqa: D102
        return super().get(block, timeout if timeout is None else min(timeout, STOP_POLL_S))


@contextmanager
def one_pass_dispatch() -> Iterator[None]:
    """While inside, Flower's simulation hands messages to its workers with one pass over the
    stored messages per sweep.

    Flower 1.42's ``add_messages_to_queue`` (``flwr.server.superlink.fleet.vce.vce_api``) asks
    the in-memory LinkState, every 0.1 s, for each of the N nodes in turn for one undelivered
    message, and each ask scans the stored messages from the start (``get_message_ins``): N x M
    checks per sweep with the state lock held. At 1,000 nodes and 100 messages a 5-round run
    took 6.3x the plain loop's time; with one pass, 1.27x (docs/results/scale). Flower offers no
    option for it."""
    require_supported_flower()
    import importlib

    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    vce_api = importlib.import_module(VCE_API)
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or not hasattr(InMemoryLinkState, "_check_stored_messages"):
        raise _shape_error(f"{VCE_API}.add_messages_to_queue or "
                           "InMemoryLinkState._check_stored_messages")
    if getattr(vce_api, "Queue", None) not in (Queue, PromptQueue):
        raise _shape_error(f"{VCE_API} no longer makes its queues with queue.Queue")
    queue_class = vce_api.Queue
    vce_api.add_messages_to_queue, vce_api.Queue = _add_messages_to_queue, PromptQueue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue, vce_api.Queue = original, queue_class
