"""Flower's simulation dispatcher at many nodes: its cost, and a one-pass replacement.

Flower 1.42's simulation engine hands messages to its workers in a thread
(``add_messages_to_queue`` in ``flwr.server.superlink.fleet.vce.vce_api``) that, every 0.1 s,
asks the in-memory LinkState for each of the N nodes in turn for one undelivered message
(``get_message_ins(node_id, limit=1)``); each ask scans the stored messages from the start and
checks every one it passes (``_check_stored_messages``: the clock, expiry, federation). With M
messages stored a sweep costs about N x M checks, holds the state lock and the GIL all the while,
and delivers a message only when the sweep reaches its node: at 10,000 nodes and 100 messages a
sweep takes seconds, and a wave to every node (``query.whoami``, M = N) takes O(N^2).

`one_pass_dispatch` replaces that function: per sweep it checks every stored message once, takes
for each node its first undelivered message (the one Flower's loop would take) and queues them in
Flower's node order: O(M) per sweep plus a sort of what it hands out. `sweep_seconds` times one
sweep of either on a LinkState holding N nodes and M messages (no Ray).

    python -m benchmarks.flower_dispatch --nodes 100 1000 10000 --messages 100

The replacement lives in `fedkd.flower_compat` (gated on the Flower version like every patch of
Flower internals there) and `fedkd.simulations.launch.simulate` applies it to every simulation;
`flower_own_dispatch` undoes that for a comparison (``benchmarks.scale --flower-dispatch``,
``benchmarks.sim_vs_plain --flower-dispatch``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from typing import Any
from unittest import mock

from flwr.app import Message

from fedkd import flower_compat
from fedkd.flower_compat import first_undelivered

VCE_API = "flwr.server.superlink.fleet.vce.vce_api"


def one_pass_dispatch() -> Any:
    """fedkd's own dispatcher (`fedkd.flower_compat.one_pass_dispatch`; simulations use it)."""
    return flower_compat.one_pass_dispatch()


def flower_own_dispatch() -> Any:
    """Within the block simulations run with Flower's own dispatcher (for comparisons)."""
    from contextlib import nullcontext

    import fedkd.simulations.launch as launch

    return mock.patch.object(launch, "dispatch", nullcontext)


def loaded_state(nodes: int, messages: int, per_node: int = 1) -> tuple[Any, dict[int, int]]:
    """An in-memory LinkState with `nodes` nodes and `per_node` messages to each of `messages`
    of them, as the simulation sets it up (its registration functions, its grid)."""
    import importlib

    from flwr.app import RecordDict
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity

    sim = importlib.import_module("flwr.simulation.run_simulation")
    vce_api = importlib.import_module(VCE_API)
    factory = LinkStateFactory(sim.FLWR_IN_MEMORY_DB_NAME, sim.NoOpFederationManager(),
                               ObjectStoreFactory())
    run = sim.Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 1, sim.NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[run.run_id] = sim.RunRecord(run=run)
    state.task_store[1] = sim.Task(task_id=1, run_id=run.run_id)
    mapping = vce_api._register_nodes(nodes, factory)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id
    TaskIdentity.node_id = sim.SUPERLINK_NODE_ID
    grid = sim.InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    targets = list(mapping)[::max(1, nodes // max(messages, 1))][:messages]
    grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query.x",
                                group_id=str(k)) for k in range(per_node) for n in targets])
    return state, mapping


def flower_sweep(state: Any, nodes_mapping: Iterable[int]) -> list[Message]:
    """One sweep of Flower's own loop body."""
    out = []
    for node_id in nodes_mapping:
        out += state.get_message_ins(node_id=node_id, limit=1)
    return out


def sweep_seconds(nodes: int, messages: int, one_pass: bool) -> tuple[float, int]:
    """Seconds one sweep takes, and the messages it hands out."""
    state, mapping = loaded_state(nodes, messages)
    t = time.perf_counter()
    out = (first_undelivered(state, {n: i for i, n in enumerate(mapping)}) if one_pass
           else flower_sweep(state, mapping))
    return time.perf_counter() - t, len(out)


def main(argv: list[str] | None = None) -> None:
    """CLI: time one sweep of each dispatcher."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flower_dispatch")
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--messages", type=int, nargs="+", default=[100])
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"{'nodes':>7}{'messages':>10}{'Flower sweep s':>16}{'one pass s':>12}")
    for nodes in args.nodes:
        for messages in args.messages:
            flower, n1 = sweep_seconds(nodes, messages, one_pass=False)
            fast, n2 = sweep_seconds(nodes, messages, one_pass=True)
            assert n1 == n2 == min(messages, nodes), (n1, n2)
            print(f"{nodes:>7}{messages:>10}{flower:>16.3f}{fast:>12.4f}", flush=True)


if __name__ == "__main__":
    main()
