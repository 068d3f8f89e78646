"""Local-only baseline: every client trains on its own data, nothing but metrics is exchanged."""

from __future__ import annotations

from fedkd.strategies.base import KDStrategy


class Local(KDStrategy):
    """Each round the clients revisit their private data and report test accuracy.

    It runs through the same ClientApp and round loop as the KD strategies, with no transfer set
    and no aggregation, so its numbers are comparable to theirs.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.pop("aggregator", None)
        super().__init__(aggregator=None, **kwargs)
