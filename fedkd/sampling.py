"""Which partitions train in a round: a pure, seeded function of the seed, the round and who is free.

Flower node ids are random per run, so sampling node ids makes a run with ``fraction_train < 1``
depend on them. fedkd samples *partition ids* instead, with `sample_partitions`; the server's
strategies map them to nodes (`fedkd.strategies.partitions`) and the plain-PyTorch reference
(`benchmarks.plain_loop`) calls the same function, so both train the same clients every round.

Flower-free on purpose: no engine, no grid, no node ids.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from fedkd.errors import require_int, require_number

__all__ = ["check_sampling", "sample_partitions", "sample_size"]


def sample_size(num_partitions: int, fraction: float, min_nodes: int) -> int:
    """How many partitions a round samples: ``max(int(num_partitions * fraction), min_nodes)``,
    at most `num_partitions` (Flower's FedAvg rule, counted in partitions, not connected nodes)."""
    return min(num_partitions, max(int(num_partitions * fraction), min_nodes))


def sample_partitions(
    num_partitions: int,
    fraction: float,
    min_nodes: int,
    seed: int,
    server_round: int,
    available: Iterable[int] | None = None,
) -> list[int]:
    """The sorted partition ids that train in `server_round`.

    Parameters
    ----------
    num_partitions : int
        Partitions of the run (``num_clients``); the sample size is `sample_size` of it.
    fraction : float
        Fraction of the partitions to sample, in (0, 1].
    min_nodes : int
        Sample at least this many (as many as are available, if fewer).
    seed : int
        The strategy's seed.
    server_round : int
        The round; each round draws from its own RNG, ``random.Random("fedkd.sample/<seed>/<round>")``
        (a str seed is hashed with SHA-512, not Python's salted ``hash``), so round r's sample
        depends neither on earlier rounds nor on the process.
    available : iterable of int or None
        Partitions whose node is connected and owes no reply; None means all of them. The sample is
        drawn among these, so with every partition available it is the same as with None.

    Returns
    -------
    list of int
        Sorted, distinct partition ids, ``min(len(available), sample_size(...))`` of them.

    Raises
    ------
    ValueError
        For a fraction outside (0, 1], a negative count or round, or an available id outside
        ``0..num_partitions - 1``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if num_partitions < 0 or min_nodes < 0 or server_round < 0:
        raise ValueError(f"num_partitions, min_nodes and server_round must be >= 0, got "
                         f"{num_partitions}, {min_nodes}, {server_round}")
    pool = list(range(num_partitions)) if available is None else sorted(set(available))
    outside = [p for p in pool if not 0 <= p < num_partitions]
    if outside:
        raise ValueError(f"available partition ids {outside} are outside 0..{num_partitions - 1}")
    size = min(len(pool), sample_size(num_partitions, fraction, min_nodes))
    if size == len(pool):
        return pool
    return sorted(random.Random(f"fedkd.sample/{seed}/{server_round}").sample(pool, size))


def check_sampling(fraction_train: object, min_train_nodes: object, min_available_nodes: object,
                   seed: object, wait_for_nodes_s: object) -> None:
    """A strategy's sampling options (`fedkd.errors.ConfigError` naming the first bad one)."""
    require_number("fraction_train", fraction_train, 0.0, 1.0, low_open=True)
    require_int("min_train_nodes", min_train_nodes, 0)
    require_int("min_available_nodes", min_available_nodes, 0)
    require_int("seed", seed, 0)
    require_number("wait_for_nodes_s", wait_for_nodes_s, 0.0)
