"""Constant-size messages: what a node already holds is named by digest, not sent again.

Two values are worth not resending:

- the settings document (``fedkd.settings``, the same every round): after a node answered a
  message that carried it, later messages carry only ``fedkd.settings-digest``;
- the rows a node answered on (its last ``next.<rows>``): when the soft targets belong to those
  rows, ``targets.<rows>`` is left out and ``fedkd.targets-rows`` names them by digest (synthetic
  inputs then travel once per round, not twice).

`HeldValues` is the server's ledger of what each node holds (used by `fedkd.wire.WireGrid`);
the node's half is `fedkd.client.wire_mod`, which keeps the values in its ``Context.state``
and puts them back into the message before any handler reads it. A node that cannot (a
restarted node lost its state) answers with an error; the server then forgets what it thought
the node held and sends everything again. Digests are checked on the node: a wrong one is an
error, never a silently different value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedkd.protocol import (
    CONFIG, NEXT, ROW_KINDS, SETTINGS_DIGEST, SETTINGS_KEY, TARGETS, TARGETS_HELD, TRANSFER,
    text_digest,
)
from fedkd.records import rows_digest

SETTINGS, ROWS = "settings", "rows"
"""The values a node may hold."""


@dataclass
class HeldValues:
    """Per node, the digests of the values it acknowledged holding (by answering without error)."""

    held: dict[int, dict[str, str]] = field(default_factory=dict)
    _offered: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    _memo: dict[int, str] = field(default_factory=dict)

    def slim(self, messages: list[Message]) -> tuple[list[Message], list[dict[str, str]]]:
        """The messages with what their nodes hold left out, and what each one offers to hold
        (pass it to `sent` with the message ids)."""
        self._memo.clear()  # arrays shared by one wave's messages are hashed once
        slimmed, offers = [], []
        for message in messages:
            new, offer = self._slim(message)
            slimmed.append(new)
            offers.append(offer)
        return slimmed, offers

    def sent(self, message_ids: list[str], nodes: list[int], offers: list[dict[str, str]]) -> None:
        """Remember what each pushed message offers its node, until its reply comes."""
        for mid, node, offer in zip(message_ids, nodes, offers):
            if offer:
                self._offered[mid] = (node, offer)

    def replied(self, reply: Message) -> None:
        """A reply came: without error the node holds what its request offered; with an error
        it may hold nothing (it is sent everything again)."""
        node, offer = self._offered.pop(reply.metadata.reply_to_message_id, (None, None))
        source = reply.metadata.src_node_id
        if reply.has_error():
            self.held.pop(source, None)
        elif node is not None and node == source:
            self.held.setdefault(node, {}).update(offer)

    def unanswered(self, message_ids: list[str]) -> None:
        """Messages that got no reply in time: what their nodes hold is unknown now."""
        for mid in message_ids:
            node, _ = self._offered.pop(mid, (None, None))
            if node is not None:
                self.held.pop(node, None)

    def state_dict(self, nodes: Any) -> dict[str, Any]:
        """What each node holds, by partition (a checkpoint's: node ids differ from run to run;
        the nodes' own half is in their ``Context.state``, checkpointed with them)."""
        return {"held": nodes.to_partitions({n: dict(v) for n, v in self.held.items()})}

    def load_state_dict(self, state: dict[str, Any], nodes: Any) -> None:
        """Inverse of `state_dict`, onto this run's nodes (`fedkd.strategies.checkpointed.Nodes`)."""
        self.held = {int(n): dict(v) for n, v in nodes.to_nodes(state["held"]).items()}

    def _digest(self, key: str, array: Array) -> str:
        if id(array) not in self._memo:
            self._memo[id(array)] = rows_digest(key, array)
        return self._memo[id(array)]

    def _slim(self, message: Message) -> tuple[Message, dict[str, str]]:
        if message.has_error():
            return message, {}
        content, node = message.content, message.metadata.dst_node_id
        holds = self.held.get(node, {})
        offer: dict[str, str] = {}
        config = content.config_records.get(CONFIG)
        transfer = content.array_records.get(TRANSFER)
        new_config = dict(config) if config is not None else None
        if new_config is not None and isinstance(new_config.get(SETTINGS_KEY), str):
            digest = text_digest(new_config[SETTINGS_KEY])
            offer[SETTINGS] = new_config[SETTINGS_DIGEST] = digest
            if holds.get(SETTINGS) == digest:
                del new_config[SETTINGS_KEY]
        new_transfer = None
        if transfer is not None and new_config is not None:
            for kind in ROW_KINDS:
                if f"{NEXT}.{kind}" in transfer:
                    offer[ROWS] = self._digest(f"{NEXT}.{kind}", transfer[f"{NEXT}.{kind}"])
            for kind in ROW_KINDS:
                key = f"{TARGETS}.{kind}"
                if key in transfer and holds.get(ROWS) == self._digest(key, transfer[key]):
                    new_config[TARGETS_HELD] = holds[ROWS]
                    new_transfer = ArrayRecord(array_dict={
                        k: v for k, v in transfer.items() if k != key})
        if new_config is None or (new_config == dict(config) and new_transfer is None):
            return message, offer
        records = dict(content.items())
        records[CONFIG] = ConfigRecord(new_config)
        if new_transfer is not None:
            records[TRANSFER] = new_transfer
        slim = Message(RecordDict(records), dst_node_id=node,
                       message_type=message.metadata.message_type,
                       group_id=message.metadata.group_id, ttl=message.metadata.ttl)
        return slim, offer
