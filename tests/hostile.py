"""A ClientApp with hostile partitions, for real simulations (Ray workers import it by name).

`HostileApp` answers exactly as fedkd's ClientApp, then overwrites fields of the replies of the
partitions its plan names, per round: ``plan[partition][key] = [round 1 value, round 2, ...]``
(``key`` a metric, or ``logits`` for the logits array; None leaves that round's value alone).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp


class HostileApp(ClientApp):
    """`honest` (its handlers and mods), with the planned fields overwritten in its replies."""

    def __init__(self, honest: ClientApp, plan: dict[int, dict[str, list[Any]]]) -> None:
        self.__dict__.update(honest.__dict__)
        self.plan = plan

    def __call__(self, message: Message, context: Context) -> Message:  # noqa: D102
        out = super().__call__(message, context)
        fields = self.plan.get(int(context.node_config["partition-id"]), {})
        server_round = int(message.metadata.group_id)
        if out.has_error():
            return out
        for key, values in fields.items():
            value = values[(server_round - 1) % len(values)]
            if value is None:
                continue
            if key == "logits":
                out.content["logits"]["logits"] = Array(np.asarray(value, dtype=np.float32))
            else:
                out.content["metrics"][key] = value
        return out
