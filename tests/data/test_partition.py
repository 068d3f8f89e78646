"""Partitioning the private rows with flwr-datasets partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.data.partition import (
    class_histograms,
    make_partitioner,
    partition_hash,
    partition_indices,
)
from fedkd.errors import ConfigError
from tests.data.factories import DIRICHLET, IID, PATHOLOGICAL

LABELS = np.arange(600) % 6
CONFIGS = {"iid": IID, "dirichlet": DIRICHLET, "pathological": PATHOLOGICAL}


def _parts(cfg: dict, seed: int, labels: np.ndarray = LABELS, clients: int = 5) -> list[np.ndarray]:
    partitioner = make_partitioner(cfg, clients, len(labels), seed=seed, num_classes=6)
    return partition_indices(labels, partitioner, clients)


@pytest.mark.parametrize("name", CONFIGS)
def test_partition_covers_rows_once_and_is_sorted(name: str) -> None:
    parts = _parts(CONFIGS[name], seed=0)

    joined = np.concatenate(parts)
    assert len(parts) == 5 and len(np.unique(joined)) == len(joined)
    assert all(np.array_equal(p, np.sort(p)) and p.dtype == np.int64 for p in parts)
    if name != "pathological":
        assert len(joined) == len(LABELS)


@pytest.mark.parametrize("name", ["dirichlet", "pathological"])
def test_partition_hash_follows_seed(name: str) -> None:
    first, again, other = (partition_hash(_parts(CONFIGS[name], seed=s)) for s in (1, 1, 2))

    assert first == again
    assert first != other
    assert len(first) == 16


def test_pathological_gives_at_most_k_classes_per_client() -> None:
    labels = np.arange(1000) % 10
    cfg = {**PATHOLOGICAL, "num_classes_per_partition": 3}
    partitioner = make_partitioner(cfg, 8, len(labels), seed=4, num_classes=10)

    parts = partition_indices(labels, partitioner, 8)

    assert all(len(np.unique(labels[p])) <= 3 for p in parts)


def test_histograms_sum_to_client_sizes() -> None:
    parts = _parts(DIRICHLET, seed=3)

    hist = class_histograms(LABELS, parts, num_classes=6)

    assert hist.shape == (5, 6)
    assert hist.sum(axis=1).tolist() == [len(p) for p in parts]
    assert hist.sum(axis=0).tolist() == np.bincount(LABELS).tolist()


def test_partition_hash_depends_on_order_and_boundaries() -> None:
    a = [np.array([0, 1]), np.array([2])]

    assert partition_hash(a) == partition_hash([p.copy() for p in a])
    assert partition_hash(a) != partition_hash([np.array([0]), np.array([1, 2])])
    assert partition_hash(a) != partition_hash(a[::-1])


def test_given_seed_overrides_the_config_seed() -> None:
    partitioner = make_partitioner({**DIRICHLET, "seed": 99}, 5, 600, seed=7)

    assert partitioner._seed == 7


BAD = {
    "too many clients": (IID, 601, None, r"num_clients=601 exceeds the 600 private samples"),
    "zero clients": (IID, 0, None, r"^num_clients=0: must be an int >= 1"),
    "alpha zero": ({**DIRICHLET, "alpha": 0}, 5, None,
                   r"^partition\.partitioner\.alpha=0: must be a number > 0"),
    "alpha negative list": ({**DIRICHLET, "alpha": [1, -1, 1, 1, 1]}, 5, None,
                            r"^partition\.partitioner\.alpha=\[1, -1"),
    "k too large": ({**PATHOLOGICAL, "num_classes_per_partition": 7}, 5, 6,
                    r"num_classes_per_partition=7: must be an int in 1\.\.6"),
    "k zero": ({**PATHOLOGICAL, "num_classes_per_partition": 0}, 5, 6,
               r"num_classes_per_partition=0: must be"),
    "min size": ({**DIRICHLET, "min_partition_size": 200}, 5, None, r"min_partition_size=200"),
    "unknown kwarg": ({**DIRICHLET, "alfa": 1}, 5, None, r"DirichletPartitioner.*alfa"),
    "unknown target": ({"_target_": "flwr_datasets.partitioner.Nope"}, 5, None, r"Nope"),
    "no target": ({"alpha": 1}, 5, None, r"partition.partitioner must .* '_target_'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_partition_config_raises_config_error(case: str) -> None:
    cfg, clients, num_classes, message = BAD[case]

    with pytest.raises(ConfigError, match=message):
        make_partitioner(cfg, clients, 600, seed=0, num_classes=num_classes)


def test_dirichlet_whose_draws_fail_with_enough_rows_says_so() -> None:
    labels = np.arange(100) % 10
    cfg = {**DIRICHLET, "alpha": 0.05, "min_partition_size": 9}
    partitioner = make_partitioner(cfg, 10, len(labels), seed=0)

    with pytest.raises(ConfigError) as err:
        partition_indices(labels, partitioner, 10)

    message = str(err.value)
    assert message.startswith("partition: 10 clients x min_partition_size=9 needs 90 of the 100 "
                              "private rows (10.0 per client on average): enough in total")
    assert "alpha=0.05" in message and "larger partition.partitioner.alpha" in message
    assert "partition.partitioner.self_balancing=true" in message and "\n" not in message


def test_dirichlet_failure_with_self_balancing_does_not_suggest_it() -> None:
    labels = np.arange(100) % 10
    cfg = {**DIRICHLET, "alpha": 0.05, "min_partition_size": 9, "self_balancing": True}
    partitioner = make_partitioner(cfg, 10, len(labels), seed=0)

    with pytest.raises(ConfigError, match=r"enough in total") as err:
        partition_indices(labels, partitioner, 10)

    assert "self_balancing" not in str(err.value)


def test_dirichlet_with_too_few_rows_names_clients_rows_and_min_size() -> None:
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = np.arange(40) % 4  # built directly: make_partitioner would refuse it up front
    partitioner = DirichletPartitioner(10, "label", alpha=0.5, min_partition_size=5, seed=0)

    with pytest.raises(ConfigError) as err:
        partition_indices(labels, partitioner, 10)

    assert str(err.value) == (
        "partition: 10 clients x min_partition_size=5 needs 50 private rows, but only 40 private "
        "rows remain after the test and public rows; use fewer clients (num_clients), a smaller "
        "partition.partitioner.min_partition_size, a smaller dataset.public_size or more data"
    )


def test_too_few_rows_is_caught_before_partitioning() -> None:
    with pytest.raises(ConfigError, match=r"^partition: 10 clients x min_partition_size=5 needs 50 "
                                          r"private rows, but only 40 private rows .*num_clients"):
        make_partitioner(DIRICHLET, 10, 40, seed=0)


def test_too_few_rows_for_the_partitioners_default_min_size() -> None:
    cfg = {k: v for k, v in DIRICHLET.items() if k != "min_partition_size"}  # flwr default: 10

    with pytest.raises(ConfigError, match=r"10 clients x min_partition_size=10 needs 100 .* 60 "):
        make_partitioner(cfg, 10, 60, seed=0)


def test_other_partitioner_failures_keep_their_own_message() -> None:
    class _Broken:
        dataset = None

        def load_partition(self, partition_id: int):
            raise ValueError("something else")

    with pytest.raises(ConfigError, match=r"^partition: _Broken failed on 4 rows: something else$"):
        partition_indices(np.array([0, 1, 0, 1]), _Broken(), 2)


class _EmptyLastPartitioner:
    """Stub partitioner that gives the last client nothing."""

    dataset = None

    def load_partition(self, partition_id: int):
        rows = [] if partition_id == 2 else [partition_id]
        return self.dataset.select(rows)


def test_empty_partition_is_a_config_error() -> None:
    message = r"_EmptyLastPartitioner left client\(s\) \[2\] without data"
    with pytest.raises(ConfigError, match=message):
        partition_indices(np.array([0, 1, 0, 1]), _EmptyLastPartitioner(), 3)
