"""DS-FL (Itahara et al. 2021): distillation-based semi-supervised FL with entropy reduction.

Like FedMD, clients exchange logits on an unlabeled open set (the public transfer set), but the
server sharpens the averaged prediction (entropy reduction aggregation, `era`) before sending
it back, which counters the soft, ambiguous consensus of non-IID teachers.
"""

from __future__ import annotations

from functools import partial

from fedkd.strategies.base import Aggregator, KDStrategy


class DSFL(KDStrategy):
    """DS-FL on Flower's Message API; see `KDStrategy` for the parameters.

    Parameters
    ----------
    aggregator : callable or None
        Defaults to `fedkd.aggregation.era` with the given `sharpen` temperature.
    sharpen : float
        ERA temperature (< 1 sharpens) used when no aggregator is given.
    """

    def __init__(self, aggregator: Aggregator | None = None, sharpen: float = 0.1, **kwargs) -> None:
        if aggregator is None:
            from fedkd.aggregation import check_number, era

            check_number("sharpen", sharpen, low=0.0)

            aggregator = partial(era, sharpen=sharpen)
        super().__init__(aggregator=aggregator, **kwargs)
