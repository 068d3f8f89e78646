"""`flwr run .`'s ServerApp refuses a simulation whose num-supernodes differs from num_clients."""

from __future__ import annotations

import time

import pytest
from flwr.superlink.grid import InMemoryGrid

from fedkd.errors import ConfigError
from fedkd.simulations.serverapp import check_supernodes, simulated_node_count


class _Registering(InMemoryGrid):
    """Flower's simulation grid as the ServerApp sees it: nodes appear one by one, shortly after
    the ServerApp starts."""

    def __init__(self, total: int, every_s: float = 0.01, delay_s: float = 0.1) -> None:
        self.total, self.every_s, self.start = total, every_s, time.monotonic() + delay_s

    def get_node_ids(self) -> list[int]:
        elapsed = time.monotonic() - self.start
        if elapsed < 0:
            return []
        return list(range(min(self.total, int(elapsed / self.every_s) + 1)))


class _Deployed:
    """Not the simulation engine's grid: two nodes connected so far."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_waits_for_every_simulated_node() -> None:
    assert simulated_node_count(_Registering(30), settle_s=0.2) == 30


@pytest.mark.parametrize("nodes", [2, 12])
def test_a_different_number_of_supernodes_is_refused_naming_both(nodes: int) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_supernodes(_Registering(nodes), num_clients=10, settle_s=0.2)

    message = str(err.value)
    assert f"num-supernodes={nodes}" in message and "num_clients=10" in message
    assert '"num-supernodes=10"' in message and "\n" not in message
    assert time.monotonic() - start < 5  # fails fast, before any round


def test_matching_numbers_and_deployments_pass() -> None:
    check_supernodes(_Registering(10), num_clients=10, settle_s=0.2)
    check_supernodes(_Deployed(), num_clients=10)  # nodes join later: the strategy waits
