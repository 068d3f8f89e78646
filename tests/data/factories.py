"""Small factories and config nodes shared by the data tests."""

from __future__ import annotations

import numpy as np

from fedkd.data.raw import RawData

DIGITS_CFG = {
    "name": "digits",
    "source": {"_target_": "fedkd.data.sources.digits"},
    "test_fraction": 0.3,
    "public_size": 400,
    "normalize": "minmax",
}
IID = {"_target_": "flwr_datasets.partitioner.IidPartitioner"}
DIRICHLET = {
    "_target_": "flwr_datasets.partitioner.DirichletPartitioner",
    "partition_by": "label",
    "alpha": 0.5,
    "min_partition_size": 5,
}
PATHOLOGICAL = {
    "_target_": "flwr_datasets.partitioner.PathologicalPartitioner",
    "partition_by": "label",
    "num_classes_per_partition": 2,
}


def make_raw(
    n: int = 300, num_classes: int = 3, shape: tuple[int, ...] = (4,), seed: int = 0
) -> RawData:
    """Gaussian features with balanced cyclic labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    return RawData(x=x, y=y.astype(np.int64), num_classes=num_classes, input_shape=shape)
