"""A ClientApp that fails on chosen partitions, for simulations of broken clients.

It lives in a module of its own so that Ray's workers can import it: the simulation ships the
ClientApp to them by reference.
"""

from __future__ import annotations

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
