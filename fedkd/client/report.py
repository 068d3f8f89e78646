"""What a deployed node adds to each reply: who it is and how long its handler computed.

- ``node`` ConfigRecord: ``arch`` and ``role`` (a node may choose its own in its node config; the
  server learns them here, e.g. for the results' per-architecture accuracy);
- ``compute-s`` in the ``metrics`` record: seconds the handler ran, without Flower's messaging
  (the reference for the per-round latency of a deployment).

Only deployed nodes (node config ``data-path``) report; simulation replies stay as they were.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message

from fedkd.client.node import NodeConfig, node_settings
from fedkd.settings import ClientSettings
from fedkd.protocol import COMPUTE_S, CONFIG, METRICS, NODE, NODE_ARCH, NODE_ROLE


def report_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: time the handler; on a deployed node add ``node`` and ``compute-s``."""
    start = time.perf_counter()
    reply = call_next(msg, context)
    seconds = time.perf_counter() - start
    if reply.has_error() or CONFIG not in msg.content:
        return reply
    node = NodeConfig.from_context(context)
    if not node.deployed:
        return reply
    settings = node_settings(ClientSettings.from_config(msg.content[CONFIG]), context)
    arch, _ = settings.arch_of(node.partition_id)
    reply.content[NODE] = ConfigRecord({NODE_ARCH: arch, NODE_ROLE: settings.role_of(node.partition_id)})
    if METRICS in reply.content:
        reply.content[METRICS][COMPUTE_S] = seconds
    return reply
