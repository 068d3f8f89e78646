"""Where a client's data comes from, and the check that its public set is the shared one.

In simulation each client reads its partition from the prepared cache (a folder on disk, keyed
by the data config hash). A deployed SuperNode (node config ``data-path``) reads its own files
instead (`fedkd.client.node_data`). Either way the public set's fingerprint must equal the one
the server announces, every round. The arrays are memoised per process: a cache, not state.

Set-up cost at many clients: a Ray actor serves many partitions, so the per-partition caches
miss for a client it has not served lately. A miss then reads only that partition: its own
``client_<i>.npz`` and its member of ``own_test.npz``, which stays open per process
(`fedkd.data.own_test`) instead of being read whole (one array per client) at every miss.
The public rows a round names (`transfer_inputs`) are the same for every client of the round:
the process gathers them once, not once per client and message.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, Context

from fedkd.client.node import NodeConfig
from fedkd.settings import ClientSettings
from fedkd.data import fingerprint, load_client, load_public, load_test
from fedkd.data.own_test import own_test_chunks
from fedkd.data.ship import ensure_cache
from fedkd.protocol import rows_to_inputs
from fedkd.records import rows_of

GATHERED_KEPT = 4
"""How many gathered sets of public rows a process keeps (`transfer_inputs`)."""
_gathered: OrderedDict[tuple[str, str, bytes], torch.Tensor] = OrderedDict()


class PublicSetMismatch(ValueError):
    """This node's public transfer set differs from the one the server announced."""


@dataclass(frozen=True)
class ClientData:
    """Tensors a client trains and evaluates on."""

    x: torch.Tensor
    y: torch.Tensor
    public_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    own_test: torch.Tensor | None = None
    """Indices of this client's own-label test chunk (simulation), or None."""
    public_digest: str = ""
    """The fingerprint of `public_x` (checked against the server's; "" when unknown)."""


@lru_cache(maxsize=8)
def _public(cache_dir: str) -> tuple[torch.Tensor, str]:
    x = load_public(cache_dir)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), fingerprint(x)


@lru_cache(maxsize=8)
def _test(cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_test(cache_dir)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


@lru_cache(maxsize=64)
def _private(cache_dir: str, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_client(cache_dir, partition_id)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


@lru_cache(maxsize=64)
def _own_test(cache_dir: str, partition_id: int) -> torch.Tensor | None:
    idx = own_test_chunks(cache_dir).get(partition_id)
    return None if idx is None else torch.from_numpy(idx.astype(np.int64))


def partition_id_of(context: Context) -> int:
    """The node's partition id (simulation sets it; deployment passes it as node config)."""
    return NodeConfig.from_context(context).partition_id


def client_data(context: Context, settings: ClientSettings) -> ClientData:
    """Load this node's private, public and test data and check the public fingerprint."""
    node = NodeConfig.from_context(context)
    if node.deployed:
        data = _node_data(node, settings)
    else:
        cache_dir = ensure_cache(settings.data)  # on a Ray cluster: fetched once per node
        public_x, digest = _public(cache_dir)
        x, y = _private(cache_dir, node.partition_id)
        test_x, test_y = _test(cache_dir)
        data = ClientData(x=x, y=y, public_x=public_x, test_x=test_x, test_y=test_y,
                          own_test=_own_test(cache_dir, node.partition_id),
                          public_digest=digest)
    check_public(data.public_digest, str(settings.data["public_fingerprint"]))
    return data


def transfer_inputs(record: ArrayRecord, prefix: str, data: ClientData) -> torch.Tensor | None:
    """The inputs ``<prefix>.<kind>`` of `record` names (`fedkd.records.rows_from`).

    Public rows (a mask or indices) are gathered once per process and public set: every client
    of a round is sent the same rows, and gathering them (1,000 MNIST rows: 3 MB) cost each
    message about as much as its logits. The tensor is shared between messages: nothing
    writes into it. Inputs (synthetic rows) are decoded per message.
    """
    rows = rows_of(record, prefix)
    if rows is None:
        return None
    if not np.issubdtype(rows.dtype, np.integer) or not data.public_digest:
        return rows_to_inputs(rows, data.public_x, prefix)
    key = (data.public_digest, rows.dtype.str, rows.tobytes())
    if key in _gathered:
        _gathered.move_to_end(key)
        return _gathered[key]
    inputs = rows_to_inputs(rows, data.public_x, prefix)  # checks the rows first
    _gathered[key] = inputs
    while len(_gathered) > GATHERED_KEPT:
        _gathered.popitem(last=False)
    return inputs


def check_public(digest: str, expected: str) -> None:
    """Refuse to distil on a public set other than the announced one."""
    if digest != expected:
        raise PublicSetMismatch(
            f"public transfer set fingerprint mismatch: this node holds {digest}, the server "
            f"announced {expected}; refusing to distil on a different public set"
        )


def _node_data(node: NodeConfig, settings: ClientSettings) -> ClientData:
    from fedkd.client.node_data import load_node_arrays

    arrays = load_node_arrays(node, settings.data)
    return ClientData(
        x=torch.from_numpy(arrays.x), y=torch.from_numpy(arrays.y),
        public_x=torch.from_numpy(np.ascontiguousarray(arrays.public_x)),
        test_x=torch.from_numpy(arrays.test_x), test_y=torch.from_numpy(arrays.test_y),
        public_digest=fingerprint(arrays.public_x),
    )
