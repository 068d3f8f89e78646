"""Where a client's set-up time goes at many clients (no Flower engine, no Ray).

    python -m benchmarks.client_setup --clients 1000 10000 [--sample 200] [--whole-archive]
        [hydra overrides...]

For each client count it prepares the `benchmarks.scale` config (MNIST, iid, MLP), then, in this
process, opens a round (`fedkd.client.round.open_round`'s steps, timed one by one) for `sample`
partitions as a Ray actor that has not served them lately would: first as a new client (its
student created, seeded), then again with the student restored from its `Context.state`. The
per-process data caches start empty and are cleared between the two passes, so every set-up
reads its partition from disk (a cache miss, what an actor serving thousands of partitions
sees). ``--whole-archive`` reads ``own_test.npz`` whole at each miss, as the client did before
`fedkd.data.own_test` (the numbers before the change).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any
from unittest import mock

import numpy as np
import pandas as pd
import torch

STEPS = ("settings", "node_settings", "data", "student", "save")


@contextmanager
def whole_archive() -> Any:
    """Within the block a client reads ``own_test.npz`` whole at every cache miss (as before)."""
    from fedkd.client import data
    from fedkd.data.cache import load_own_test

    class Whole:
        def __init__(self, cache_dir: str) -> None:
            self.cache_dir = cache_dir

        def get(self, partition_id: int) -> np.ndarray | None:
            return load_own_test(self.cache_dir, partition_id)

    with mock.patch.object(data, "own_test_chunks", Whole):
        yield


def clear_caches() -> None:
    """Empty the client's per-process data caches (a fresh actor, or one that missed)."""
    from fedkd.client import data
    from fedkd.data import own_test

    for fn in (data._private, data._own_test, own_test.own_test_chunks):
        fn.cache_clear()


def time_steps(msg: Any, context: Any, timer: Callable[[str], Any]) -> Any:
    """`open_round`'s steps, each under `timer`, then the save a round ends with."""
    from fedkd.client.data import client_data, partition_id_of
    from fedkd.client.node import node_settings
    from fedkd.client.state import Student
    from fedkd.protocol import CONFIG
    from fedkd.settings import ClientSettings

    with timer("settings"):
        settings = ClientSettings.from_config(msg.content[CONFIG])
    with timer("node_settings"):
        settings = node_settings(settings, context)
        pid = partition_id_of(context)
    with timer("data"):
        client_data(context, settings)
    with timer("student"):
        student = Student.restore(context, settings, pid)
    with timer("save"):
        student.save(context)


def measure(clients: int, sample: int, overrides: list[str]) -> pd.DataFrame:
    """Mean ms per client and step: new clients, then restored ones (rows ``first``/``restored``)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from benchmarks.scale import base_overrides
    from fedkd.protocol import CONFIG, SERVER_ROUND
    from fedkd.server import compose_config, prepare_run
    from fedkd.timing import PhaseTimer

    torch.set_num_threads(1)
    run = prepare_run(compose_config([*base_overrides(clients, 100, 5), *overrides]))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Message() outside an app
    config = ConfigRecord({**run.settings.to_config(), SERVER_ROUND: 1})
    pids = random.Random(0).sample(range(clients), min(sample, clients))
    contexts = {p: Context(run_id=1, node_id=100 + p, state=RecordDict(), run_config={},
                           node_config={"partition-id": p, "num-partitions": clients})
                for p in pids}
    rows = {}
    for label in ("first", "restored"):
        clear_caches()
        timer = PhaseTimer()
        for p in pids:
            msg = Message(RecordDict({CONFIG: config}), dst_node_id=100 + p,
                          message_type="train.distill", group_id="1")
            time_steps(msg, contexts[p], timer)
        rows[label] = {s: 1000 * timer.seconds.get(s, 0.0) / len(pids) for s in STEPS}
    frame = pd.DataFrame(rows).T.round(2)
    frame["total"] = frame[list(STEPS)].sum(axis=1).round(2)
    return frame


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client_setup",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--sample", type=int, default=200, help="partitions set up per pass")
    parser.add_argument("--whole-archive", action="store_true",
                        help="read own_test.npz whole at each miss (before the change)")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    for clients in args.clients:
        t = time.perf_counter()
        with whole_archive() if args.whole_archive else nullcontext():
            frame = measure(clients, args.sample, overrides)
        print(f"{clients} clients, {args.sample} set-ups per pass, ms per client "
              f"({'own_test.npz read whole' if args.whole_archive else 'one member read'}; "
              f"{time.perf_counter() - t:.0f} s with preparation):")
        print(frame.to_string(), flush=True)


if __name__ == "__main__":
    main()
