"""What crosses the wire: a Grid wrapper that sends, waits, counts and watches.

`WireGrid` wraps the Grid a ServerApp receives and is handed to any strategy (fedkd's own or
Flower's) in its place. It is the one place that sees every message, so it

- polls with its own short push/pull loop (Flower's HTTP grid sleeps 3 s between pulls);
- never waits longer than the timeout, and remembers unanswered messages ("stragglers"): a node
  with an unanswered message gets no new one until its old reply arrives (then discarded), so two
  state updates on one node never race;
- leaves out what a node already holds (the settings, the rows it answered on: `HeldValues`,
  `fedkd.wire_cache`), so a message's size does not grow with the run;
- encodes what it sends and decodes what comes back with the run's codec (`fedkd.wire_codec`);
- counts the bytes of every message in both directions, as they travel (encoded);
- checks every reply that is not an error (`ReplyCheck`: `fedkd.reply_guard.ReplyGuard`, bound
  to the run by `fedkd.server.run_strategy`) before anything else reads it, and drops a bad one
  with one warning naming the node and the field (`WireStats.dropped`);
- returns replies sorted by the partition id clients report (arrival order varies);
- hands every reply to observers (results recorder, progress, protocol tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedkd.protocol import METRICS, PARTITION_ID
from fedkd.wire_cache import HeldValues

if TYPE_CHECKING:
    from fedkd.wire_codec import WireCodec

log = logging.getLogger(__name__)

ReplyObserver = Callable[[int, list[Message], "WireStats"], None]


class ReplyCheck(Protocol):
    """Checks one reply (not an error) against the request it answers, before anything uses it.

    `wave` holds the partition ids already accepted in this wave; the check adds the reply's.
    Raises ValueError (or KeyError, TypeError) naming the bad field.
    """

    def __call__(self, reply: Message, request: Message, wave: set[int]) -> None: ...


def content_bytes(content: RecordDict) -> int:
    """Bytes carried by a message's records (array data, config and metric values, keys)."""
    return sum(record.count_bytes() for record in content.values())


def message_bytes(message: Message) -> int:
    """Bytes of a message's content; an error reply counts its reason."""
    if message.has_error():
        return len(message.error.reason or "")
    return content_bytes(message.content)


@dataclass
class WireStats:
    """Traffic of one send-and-receive wave."""

    server_round: int
    message_type: str
    sent: int = 0
    replied: int = 0
    errors: int = 0
    dropped: int = 0
    """Replies that were not errors but failed the `ReplyCheck`: not returned, not observed."""
    timed_out: int = 0
    skipped_busy: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0


POLL_BACKOFF = 5.0
"""The longest wait between pulls, in `WireGrid.poll_interval`s."""


class WireGrid(Grid):
    """Grid wrapper with a fast polling loop, straggler tracking and byte counts.

    Parameters
    ----------
    grid : Grid
        The grid handed to the ServerApp (in-memory in simulation, HTTP in deployment).
    poll_interval : float
        Seconds between pulls while replies come in; after a pull that brought none the wait
        doubles, up to `POLL_BACKOFF` times this (each pull scans every pending message in
        Flower's in-memory state: fewer pulls leave the CPU to the clients).
    check : ReplyCheck or None
        Run on every reply that is not an error before it is sorted, observed or returned; a
        reply it refuses is dropped. None: replies pass unchecked (tests of the wire alone).
    codec : WireCodec or None
        Encodes requests and decodes replies (`fedkd.wire_codec`); None sends arrays as they are.
    """

    def __init__(self, grid: Grid, poll_interval: float = 0.02,
                 check: ReplyCheck | None = None, codec: WireCodec | None = None) -> None:
        self._grid = grid
        self.poll_interval = poll_interval
        self.check = check
        self.codec = codec
        self.held = HeldValues()
        self._stragglers: dict[str, int] = {}  # message id -> node id
        self.observers: list[ReplyObserver] = []
        self.waves: list[WireStats] = []

    # --- plain delegation ---------------------------------------------------------------------
    def set_run(self, run):  # noqa: D102
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self._grid.pull_messages(message_ids)

    # --- the wave -----------------------------------------------------------------------------
    def busy_node_ids(self) -> set[int]:
        """Nodes that still owe a reply from an earlier wave (after collecting late replies)."""
        if self._stragglers:
            for late in self._grid.pull_messages(list(self._stragglers)):
                node = self._stragglers.pop(late.metadata.reply_to_message_id, None)
                log.warning("late reply from node %s discarded (it missed its round)", node)
        return set(self._stragglers.values())

    def wait_for_nodes(self, min_nodes: int, timeout: float) -> list[int]:
        """Wait until at least `min_nodes` nodes are connected, at most `timeout` seconds."""
        end = time.monotonic() + timeout
        nodes = list(self.get_node_ids())
        while len(nodes) < min_nodes and time.monotonic() < end:
            time.sleep(self.poll_interval)
            nodes = list(self.get_node_ids())
        return nodes

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push messages, pull replies until all arrived or `timeout` passed, then return them.

        Messages to nodes that still owe a reply are not sent. `timeout=None` is refused:
        a wave must never block forever. Replies that fail `check` are dropped (warned, counted
        in `WireStats.dropped`); error replies are returned as they came.
        """
        if timeout is None or timeout <= 0:
            raise ValueError(f"send_and_receive needs a timeout > 0 seconds, got {timeout!r}")
        busy = self.busy_node_ids()
        batch = list(messages)
        to_send = [m for m in batch if m.metadata.dst_node_id not in busy]
        if not batch:
            return []
        stats = WireStats(
            server_round=_round_of(batch[0]),
            message_type=batch[0].metadata.message_type,
            skipped_busy=len(batch) - len(to_send),
        )
        if stats.skipped_busy:
            log.warning("%d node(s) still busy with an earlier message: skipped", stats.skipped_busy)
        start = time.monotonic()
        to_send, offers = self.held.slim(to_send)
        if self.codec is not None:
            to_send = [self.codec.encode_request(m) for m in to_send]
        stats.bytes_down = sum(message_bytes(m) for m in to_send)
        ids = list(self._grid.push_messages(to_send))
        self.held.sent(ids, [m.metadata.dst_node_id for m in to_send], offers)
        requests = dict(zip(ids, to_send))
        pending = {mid: m.metadata.dst_node_id for mid, m in requests.items()}
        stats.sent = len(ids)
        replies: list[Message] = []
        end, wait = start + timeout, self.poll_interval
        while pending:
            arrived = len(replies)
            for reply in self._grid.pull_messages(list(pending)):
                pending.pop(reply.metadata.reply_to_message_id, None)
                self.held.replied(reply)
                replies.append(reply)
            if not pending or time.monotonic() >= end:
                break
            wait = self.poll_interval if len(replies) > arrived else min(
                2 * wait, POLL_BACKOFF * self.poll_interval)
            time.sleep(min(wait, max(0.0, end - time.monotonic())))
        self._stragglers.update(pending)
        self.held.unanswered(list(pending))
        stats.timed_out = len(pending)
        if pending:
            log.warning("round %s: %d node(s) did not answer within %.0f s", stats.server_round,
                        len(pending), timeout)
        stats.replied = len(replies)
        stats.errors = sum(r.has_error() for r in replies)
        stats.bytes_up = sum(message_bytes(r) for r in replies)
        replies = self._checked(stats, replies, requests)
        replies.sort(key=reply_order)  # arrival order varies; aggregation must not
        stats.seconds = time.monotonic() - start
        for reply in replies:
            if reply.has_error():
                log.warning("node %s replied with an error (code %s): %s", reply.metadata.src_node_id,
                            reply.error.code, _first_line(reply.error.reason))
        self.waves.append(stats)
        for observer in self.observers:
            observer(stats.server_round, replies, stats)
        return replies

    def _checked(self, stats: WireStats, replies: list[Message],
                 requests: dict[str, Message]) -> list[Message]:
        """The replies `check` accepts (in arrival order), error replies included."""
        if self.check is None and self.codec is None:
            return replies
        kept, wave = [], set()
        for reply in replies:
            if not reply.has_error():
                try:
                    request = requests[reply.metadata.reply_to_message_id]
                    if self.codec is not None:
                        self.codec.decode_reply(reply, request)
                    if self.check is not None:
                        self.check(reply, request, wave)
                except (ValueError, KeyError, TypeError) as err:
                    stats.dropped += 1
                    log.warning("round %s: reply from node %s dropped: %s", stats.server_round,
                                reply.metadata.src_node_id, err)
                    continue
            kept.append(reply)
        return kept


def _round_of(message: Message) -> int:
    """The server round of a message: its group id, else its config's ``server-round``."""
    try:
        return int(message.metadata.group_id)
    except (TypeError, ValueError):
        pass
    config = message.content.config_records.get("config", {})
    return int(config.get("server-round", 0))


def reply_order(reply: Message) -> tuple[int, int]:
    """Sort key: the partition id a client reports in its metrics, then the node id."""
    partition = 1 << 62
    if not reply.has_error():
        metrics = reply.content.metric_records.get(METRICS, {})
        value = metrics.get(PARTITION_ID)
        partition = value if isinstance(value, int) and not isinstance(value, bool) else partition
    return partition, int(reply.metadata.src_node_id)


def _first_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
