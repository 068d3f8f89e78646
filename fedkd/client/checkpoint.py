"""A deployed node's student on its own disk, so that it survives a SuperNode restart.

One file per run and partition: ``<checkpoint-dir>/run-<run id>/partition-<id>.pt`` (the
partition id, not Flower's node id, which a restarted SuperNode gets anew). It holds the model's
full ``state_dict``, the optimizer state, the rounds done and the architecture name, and is
replaced atomically (written to a temporary file in the same folder, then renamed), so a crash
mid-write leaves the previous checkpoint intact. Nodes without ``data-path`` (simulation) do not
checkpoint. Tensors are written and read on the CPU, whatever device the student trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from torch import nn

from fedkd.atomic import save_atomic
from fedkd.client.node import NodeConfig
from fedkd.devices import cpu_state
from fedkd.errors import ConfigError


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint restores."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rounds_done: int
    privacy: dict[str, Any] | None = None
    """The DP-SGD accountant's state (`fedkd.dpsgd.Accountant.state_dict`), if the run has one."""


def path_of(context: Context) -> Path | None:
    """This node's checkpoint file for the current run, or None if it does not checkpoint."""
    node = NodeConfig.from_context(context)
    folder = node.checkpoints
    if folder is None:
        return None
    return folder / f"run-{context.run_id}" / f"partition-{node.partition_id}.pt"


def save(context: Context, arch: str, model: nn.Module, optimizer: torch.optim.Optimizer,
         rounds_done: int, privacy: dict[str, Any] | None = None) -> Path | None:
    """Write the checkpoint atomically; return its path (None: this node does not checkpoint)."""
    path = path_of(context)
    if path is None:
        return None
    state = {"arch": arch, "rounds_done": int(rounds_done), "model": cpu_state(model.state_dict()),
             "optimizer": cpu_state(optimizer.state_dict())}
    if privacy is not None:
        state["privacy"] = privacy
    save_atomic(state, path)
    return path


def load(context: Context, arch: str) -> Checkpoint | None:
    """The node's checkpoint for this run, if there is one; its architecture must be `arch`."""
    path = path_of(context)
    if path is None or not path.is_file():
        return None
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state.get("arch") != arch:
        raise ConfigError(f"checkpoint {path} holds a {state.get('arch')!r} student, but this node "
                          f"now runs {arch!r}; remove the file or restore the node's arch")
    return Checkpoint(path=path, model=state["model"], optimizer=state["optimizer"],
                      rounds_done=int(state["rounds_done"]), privacy=state.get("privacy"))
