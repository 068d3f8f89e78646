"""Data layer: sources, the test/public/private split, partitioning and the on-disk cache."""

from fedkd.data.partition import (
    class_histograms,
    make_partitioner,
    partition_hash,
    partition_indices,
)
from fedkd.data.prepare import (
    DataInfo,
    fingerprint,
    load_client,
    load_private_pool,
    load_public,
    load_test,
    prepare_data,
)
from fedkd.data.raw import RawData
from fedkd.data.split import Split, normalize, split_data

__all__ = [
    "DataInfo",
    "RawData",
    "Split",
    "class_histograms",
    "fingerprint",
    "load_client",
    "load_private_pool",
    "load_public",
    "load_test",
    "make_partitioner",
    "normalize",
    "partition_hash",
    "partition_indices",
    "prepare_data",
    "split_data",
]
