"""A ClientApp that fails on chosen partitions, for simulations of broken clients.

It lives in a module of its own so that Ray's workers can import it: the simulation ships the
ClientApp to them by reference.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedkd.client.data import partition_id_of


class FailingClientApp(ClientApp):
    """`inner`, except that the partitions in `failing` raise before it runs (an error reply).

    Parameters
    ----------
    inner : ClientApp
        The ClientApp that answers for the other partitions (fedkd's).
    failing : iterable of int
        Partition ids that fail every message.
    """

    def __init__(self, inner: ClientApp, failing: Iterable[int]) -> None:
        super().__init__()
        self.inner = inner
        self.failing = frozenset(failing)

    def __call__(self, message: Message, context: Context) -> Message:
        """Raise for a failing partition, else answer as `inner` does."""
        pid = partition_id_of(context)
        if pid in self.failing:
            raise RuntimeError(f"injected failure on partition {pid}")
        return self.inner(message, context)


class CrashingClientApp(ClientApp):
    """`inner`, except that partition `partition` ends its worker process in round `server_round`.

    The process exits at once (``os._exit``), as a segfault or the OOM killer would end it: no
    reply, no exception, a dead Ray actor.
    """

    def __init__(self, inner: ClientApp, partition: int, server_round: int) -> None:
        super().__init__()
        self.inner = inner
        self.partition, self.server_round = partition, server_round

    def __call__(self, message: Message, context: Context) -> Message:
        """End the process for the chosen partition and round, else answer as `inner` does."""
        if (partition_id_of(context) == self.partition
                and message.metadata.group_id == str(self.server_round)):
            os._exit(1)
        return self.inner(message, context)
