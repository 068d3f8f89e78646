"""FedMD (Li & Wang 2019): consensus on a public batch, digest, revisit.

Each round the sampled clients return logits on a batch of the public transfer set; the server
aggregates them into a consensus (by default the mean of the logits) and sends it back with the
next batch. Clients digest the consensus (KD), then revisit their private data.
"""

from __future__ import annotations

from fedkd.aggregation import mean_logits
from fedkd.strategies.base import Aggregator, KDStrategy


class FedMD(KDStrategy):
    """FedMD on Flower's Message API; see `KDStrategy` for the parameters."""

    def __init__(self, aggregator: Aggregator | None = mean_logits, **kwargs) -> None:
        if aggregator is None:
            raise ValueError("FedMD needs an aggregator (use fedkd.strategies.local.Local for none)")
        super().__init__(aggregator=aggregator, **kwargs)
