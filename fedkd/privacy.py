"""Privacy accounting for noisy label aggregation (PATE's GNMax), on Google's ``dp_accounting`` RDP accountant.

One GNMax query releases ``argmax_c (votes_c + N(0, sigma^2))`` for one transfer sample, where ``votes`` counts the
teachers' argmax classes. A teacher is one client's whole private data set; when it changes its vote, one count
drops by 1 and another rises by 1, so the vote vector moves by ``sqrt(2)`` in L2. Each query is therefore a Gaussian
mechanism with noise multiplier ``sigma / sqrt(2)`` (noise over sensitivity), with no sampling amplification, and
the queries compose in Renyi DP. This is the data-independent bound (PATE's data-dependent, smooth-sensitivity
analysis is tighter but needs the vote margins and more machinery).

Flower-free: ``dp_accounting`` (installed by ``flwr[dp]``) is the library Flower's own ``RdpAccountant`` wraps; the
ledger here is the same (default RDP orders, add-or-remove-one neighbours, one unsampled Gaussian event per query),
so the epsilons are the same as with Flower's wrapper.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import TYPE_CHECKING

from fedkd.errors import require_number

if TYPE_CHECKING:  # imported when an accountant is built: it pulls in SciPy (seconds)
    from dp_accounting.rdp import RdpAccountant


def _check_open(name: str, value: float, low: float, high: float) -> float:
    return require_number(name, value, low, None if math.isinf(high) else high, low_open=True,
                          high_open=True)


class GNMaxAccountant:
    """Cumulative (epsilon, delta) of GNMax queries answered with Gaussian noise of std ``sigma`` on vote counts.

    Parameters
    ----------
    sigma : float
        Standard deviation of the Gaussian noise added to each class's vote count (> 0).
    delta : float
        The delta at which epsilon is reported, in (0, 1).
    """

    def __init__(self, sigma: float, delta: float = 1e-5) -> None:
        self.sigma = _check_open("sigma", sigma, 0.0, math.inf)
        self.delta = _check_open("delta", delta, 0.0, 1.0)
        self._accountant = self._new_accountant()
        self._queries = 0
        self._spent: list[int] = []  # every `spend`, in order: the ledger replays exactly

    @property
    def noise_multiplier(self) -> float:
        """``sigma / sqrt(2)``: the noise std over the vote vector's L2 sensitivity."""
        return self.sigma / math.sqrt(2)

    @property
    def queries(self) -> int:
        """Number of queries (noisy labels) released so far."""
        return self._queries

    @property
    def epsilon(self) -> float:
        """Epsilon at ``delta`` of all queries so far (0 before the first)."""
        return float(self._accountant.get_epsilon(self.delta)) if self.queries else 0.0

    def epsilon_for(self, num_queries: int) -> float:
        """Epsilon at ``delta`` that ``num_queries`` queries cost on their own; the ledger is left unchanged."""
        accountant = self._new_accountant()
        self._compose(accountant, num_queries)
        return float(accountant.get_epsilon(self.delta))

    def spend(self, num_queries: int) -> float:
        """Record ``num_queries`` more queries and return what they cost on their own (``epsilon_for``).

        RDP composes sub-additively: the total ``epsilon`` grows by less than the returned value.
        """
        self._queries += self._compose(self._accountant, num_queries)
        self._spent.append(int(num_queries))
        return self.epsilon_for(num_queries)

    def state_dict(self) -> dict[str, list[int]]:
        """The queries of every `spend` so far, in order (a checkpoint's part)."""
        return {"spent": list(self._spent)}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        """Replay the spends of `state` on a fresh ledger: the same compositions in the same
        order, so epsilon equals the original's to the last bit."""
        self._accountant, self._queries, self._spent = self._new_accountant(), 0, []
        for num_queries in state["spent"]:
            self._queries += self._compose(self._accountant, num_queries)
            self._spent.append(int(num_queries))

    @staticmethod
    def _new_accountant() -> RdpAccountant:
        from dp_accounting import NeighboringRelation
        from dp_accounting.rdp import RdpAccountant

        # Default orders and add-or-remove-one neighbours, as Flower's wrapper used. Without sampling amplification
        # the neighbouring relation does not change the Gaussian bound, and the replaced-vote sensitivity sqrt(2) is
        # already in the noise multiplier.
        return RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)

    def _compose(self, accountant: RdpAccountant, num_queries: int) -> int:
        from dp_accounting import GaussianDpEvent

        if isinstance(num_queries, bool) or not isinstance(num_queries, Integral) or num_queries < 1:
            raise ValueError(f"num_queries={num_queries!r} must be an integer >= 1")
        accountant.compose(GaussianDpEvent(self.noise_multiplier), int(num_queries))
        return int(num_queries)

    def __repr__(self) -> str:
        return f"GNMaxAccountant(sigma={self.sigma:g}, delta={self.delta:g}, queries={self.queries})"
