"""The SuperNode's waits and command line (`fedkd.flower_compat`)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from fedkd.flower_compat.gate import _shape_error, require_supported_flower

log = logging.getLogger("fedkd.flower_compat")

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
    require_supported_flower()
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time and not isinstance(loop.time, CappedSleep):
        raise _shape_error("flwr.supernode.start_client_internal no longer sleeps through `time`")
    loop.time = CappedSleep(interval)


def shorten_pull_backoff(initial: float = PULL_BACKOFF) -> None:
    """Make Flower's object pulls retry a missing object after `initial` seconds first."""
    require_supported_flower()
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    for function in functions:  # check all before patching any
        if "initial_backoff" not in (function.__kwdefaults__ or {}):
            raise _shape_error(f"{function.__qualname__} has no initial_backoff any more")
    for function in functions:
        function.__kwdefaults__["initial_backoff"] = initial


def heartbeat_range() -> tuple[float, float]:
    """The heartbeat intervals a SuperLink accepts, seconds (Flower 1.42: 10..1800)."""
    require_supported_flower()
    from flwr.common import constant

    return constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL


def set_heartbeat_interval(seconds: float) -> None:
    """Make this SuperNode announce and send heartbeats every `seconds` (Flower: 30 s)."""
    require_supported_flower()
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    if not constant.HEARTBEAT_MIN_INTERVAL <= seconds <= constant.HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval must be in [{constant.HEARTBEAT_MIN_INTERVAL}, "
                         f"{constant.HEARTBEAT_MAX_INTERVAL}] s, got {seconds}")
    for module in (heartbeat, fleet_http_connection):  # check both before patching either
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise _shape_error(f"{module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL any more")
    for module in (heartbeat, fleet_http_connection):
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def run_flower_supernode(args: list[str]) -> None:
    """Run ``flower-supernode args`` in this process (where the patches above apply)."""
    require_supported_flower()
    from importlib.metadata import entry_points

    found = list(entry_points(group="console_scripts", name="flower-supernode"))
    if not found:
        raise _shape_error("flwr has no flower-supernode console script")
    main = found[0].load()
    sys.argv = ["flower-supernode", *args]
    main()


def parse_node_config(text: str) -> dict[str, Any]:
    """``--node-config`` (``'k=v k2="s"'`` or a .toml file) as the SuperNode will see it.

    Raises
    ------
    ValueError
        The text is not in Flower's format (Flower raises a click exception; its message is kept).
    """
    require_supported_flower()
    import click
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except (click.ClickException, ValueError, OSError) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        raise ValueError(message) from None
