"""Fixed waits inside Flower 1.41 that cost a deployed round seconds, shortened in one place.

- An idle SuperNode sleeps 3 s between pulls, and 0.5 s between checks for its ClientApp's reply
  (`flwr.supernode.start_client_internal`): `cap_supernode_polls` caps both sleeps.
- Every object pull (SuperNode <- SuperLink, ClientApp <- SuperNode, ServerApp <- SuperLink)
  retries an object that is not there yet after 1 s, doubling to 10 s. A SuperNode announces a
  message before its objects arrive, so the ClientApp's first pull usually misses and waits 1 s:
  `shorten_pull_backoff` makes the first retry come after 0.05 s (same doubling and cap).

- A SuperNode announces a 30 s heartbeat interval and the SuperLink counts it offline after two
  missed heartbeats (~60 s); under authentication a crashed node is let back in only then.
  `set_heartbeat_interval` makes a SuperNode announce and keep a shorter one (Flower's minimum
  is 10 s), so a crash is noticed, and a restart accepted, within ~20 s.

Each function checks that Flower still has the shape it patches and fails loudly otherwise
(fedkd pins flwr 1.41.0).
"""

from __future__ import annotations

import time
from typing import Any

PULL_BACKOFF = 0.05
"""First retry of a missing object, seconds (Flower: 1)."""


class CappedSleep:
    """Stands in for the `time` module inside one Flower module: every sleep is capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        """Sleep at most `cap` seconds."""
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_polls(interval: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop (idle pulls, waiting for a reply)."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time and not isinstance(loop.time, CappedSleep):
        raise RuntimeError("flwr.supernode.start_client_internal no longer uses the time module; "
                           "fedkd-supernode supports flwr 1.41 (run flower-supernode instead)")
    loop.time = CappedSleep(interval)


def shorten_pull_backoff(initial: float = PULL_BACKOFF) -> None:
    """Make Flower's object pulls retry a missing object after `initial` seconds first."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects,
                     inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__ or {}
        if "initial_backoff" not in defaults:
            raise RuntimeError(f"{function.__qualname__} has no initial_backoff any more; "
                               "fedkd's deployment tuning supports flwr 1.41")
        defaults["initial_backoff"] = initial


def set_heartbeat_interval(seconds: float) -> None:
    """Make this SuperNode announce and send heartbeats every `seconds` (Flower: 30 s)."""
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    if not constant.HEARTBEAT_MIN_INTERVAL <= seconds <= constant.HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval must be in [{constant.HEARTBEAT_MIN_INTERVAL}, "
                         f"{constant.HEARTBEAT_MAX_INTERVAL}] s, got {seconds}")
    for module in (heartbeat, fleet_http_connection):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL any more; "
                               "fedkd's deployment tuning supports flwr 1.41")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds
