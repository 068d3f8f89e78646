"""Faults injected on the client side: a ClientApp that applies a `fedkd.faults.FaultPlan`.

`FaultyClientApp` wraps fedkd's ClientApp (its handlers and mods run unchanged) and, for the
partitions and rounds the plan names, changes what happens to a round's message
(``train.*``; a generator's ``query`` only sees the Byzantine attack and corruption):

- ``crash``: raise before the handler runs (Flower sends an error reply);
- ``dropout``: sleep ``plan.sleep_s`` without running the handler, then raise;
- ``byzantine``: replace the honest reply's logits (`fedkd.faults.attack_logits`) and, with a
  ``claim``, its ``num-examples``;
- ``corrupt``: break the reply's logits (`fedkd.faults.corrupt_logits`);
- ``hang``: sleep ``plan.sleep_s`` after the handler ran, then reply (late).

Only the simulation uses it (`fedkd.simulations.faults.with_faults`); it lives in the client
package so that Ray's workers can import it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedkd.client.data import partition_id_of
from fedkd.faults import FaultPlan, attack_logits, corrupt_logits
from fedkd.protocol import CLASS_COUNTS, CONFIG, LOGITS, METRICS, NUM_EXAMPLES, QUERY, SERVER_ROUND

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """A crash or dropout the fault plan asked for."""


class FaultyClientApp(ClientApp):
    """`inner`, with the faults of `plan` applied to the partitions and rounds it names.

    Parameters
    ----------
    inner : ClientApp
        The honest ClientApp (fedkd's).
    plan : FaultPlan
        Who misbehaves how, and when.
    sleep : callable
        How to wait (tests pass a fake).
    """

    def __init__(self, inner: ClientApp, plan: FaultPlan, sleep=time.sleep) -> None:
        super().__init__()
        self.inner = inner
        self.plan = plan
        self.sleep = sleep

    def __call__(self, message: Message, context: Context) -> Message:
        """Answer as `inner` does, with this partition's faults of this round applied."""
        kind = message.metadata.message_type
        if not (kind.startswith("train") or kind == QUERY):
            return self.inner(message, context)
        pid, server_round = partition_id_of(context), message_round(message)
        faults = self.plan.faults_at(pid, server_round)
        if not faults:
            return self.inner(message, context)
        where = f"partition {pid}, round {server_round}"
        if kind != QUERY:
            if "crash" in faults:
                raise InjectedFault(f"injected crash ({where})")
            if "dropout" in faults:
                self.sleep(self.plan.sleep_s)
                raise InjectedFault(f"injected dropout ({where})")
        reply = self.inner(message, context)
        if reply.has_error():
            return reply
        reply = apply_reply_faults(reply, faults, self.plan, pid, server_round)
        if "hang" in faults and kind != QUERY:
            self.sleep(self.plan.sleep_s)
        return reply


def message_round(message: Message) -> int:
    """The server round of a message: its config's ``server-round``, else its group id."""
    config = message.content.config_records.get(CONFIG)
    if config is not None and SERVER_ROUND in config:
        return int(config[SERVER_ROUND])
    try:
        return int(message.metadata.group_id)
    except ValueError:
        return 0


def apply_reply_faults(reply: Message, faults: tuple[str, ...], plan: FaultPlan, client: int,
                       server_round: int) -> Message:
    """`reply` with the Byzantine attack and the corruption of `faults` applied (in place)."""
    logits = reply.content.array_records.get(LOGITS)
    if "byzantine" in faults:
        if logits is not None:
            _replace(logits, lambda x: attack_logits(x, plan.attack, plan.seed, client,
                                                     server_round))
        if plan.attack.claim is not None and METRICS in reply.content:
            reply.content[METRICS][NUM_EXAMPLES] = int(plan.attack.claim)
    if "corrupt" in faults and logits is not None:
        _replace(logits, lambda x: corrupt_logits(x, plan.corruption))
    return reply


def _replace(record: ArrayRecord, change) -> None:
    """Apply `change` to every floating array of a ``logits`` record (class counts stay)."""
    for key in list(record.keys()):
        if key == CLASS_COUNTS:
            continue
        values = record[key].numpy()
        if values.dtype.kind == "f":
            record[key] = Array(np.ascontiguousarray(change(values)))
