"""Checkpoints of a simulation, and ``resume=<run folder>``: what the app layer adds.

The strategy side (what is kept, when it is written, how rounds resume) is
`fedkd.strategies.checkpointed`. Here:

- `resume_folder` checks a ``resume=`` before anything runs: the folder holds a run of the same
  config (every value but ``resume`` itself), which has not finished; its results folder is where
  the resumed run goes on writing;
- `Checkpointing` gives a simulation its `CheckpointPlan` (``simulation.checkpoint_every``, the
  checkpoint to resume from) with the parts only the app knows: the results `Recorder` and every
  client's ``Context.state``, which Flower's simulation engine keeps (`ClientStates`, through
  `fedkd.flower_compat.capture_simulation_nodes`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedkd.errors import ConfigError, require_int
from fedkd.flower_compat import (
    SimulationNodes, UnsupportedFlowerError, capture_simulation_nodes, require_supported_flower,
)
from fedkd.records import record_dict_from_state, record_dict_state
from fedkd.server import PreparedRun
from fedkd.simulations.results import Recorder
from fedkd.strategies.checkpointed import CHECKPOINT, CheckpointPlan, Nodes, load_checkpoint

log = logging.getLogger(__name__)

RESUME = "resume"
"""The config key naming the run folder to continue."""
NOT_THE_RUN = (RESUME, "audit")
"""Keys a resumed run may set otherwise: they change no number of the run (``audit`` runs after
it)."""
FINISHED = ("ok", "degraded")
"""Summary statuses of a run that ran all its rounds: nothing to resume."""


def checkpoint_every(cfg: DictConfig) -> int:
    """``simulation.checkpoint_every``, checked: an int >= 0 (0: no checkpoints)."""
    return require_int("simulation.checkpoint_every", cfg.simulation.get("checkpoint_every", 0), 0)


def resume_folder(cfg: DictConfig) -> Path | None:
    """The run folder ``resume=`` names, checked (None without ``resume``).

    Raises ConfigError (one line) when the folder holds no run, a run of another config (the
    first differing values are named), a run that finished, or a run without rounds (the pooled
    baseline).
    """
    checkpoint_every(cfg)
    if cfg.get(RESUME) is None:
        return None
    folder = Path(str(cfg[RESUME])).expanduser()
    saved = folder / "config.yaml"
    if not saved.is_file():
        raise ConfigError(RESUME, str(folder), "no run there (no config.yaml)")
    if cfg.strategy.get("flower") is None:
        raise ConfigError(RESUME, str(folder), f"strategy={cfg.strategy.name} has no rounds to "
                          "resume; run it again")
    ours = _flat(OmegaConf.to_container(cfg, resolve=True))
    theirs = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
    differ = sorted(k for k in ours.keys() | theirs.keys()
                    if k not in NOT_THE_RUN and ours.get(k, "<unset>") != theirs.get(k, "<unset>"))
    if differ:
        shown = ", ".join(f"{k}={ours.get(k, '<unset>')} (the run's: {theirs.get(k, '<unset>')})"
                          for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ConfigError(RESUME, str(folder), f"the config differs from the run's in "
                          f"{shown}{more}; resume with the run's overrides")
    summary = folder / "summary.json"
    if summary.is_file():
        status = json.loads(summary.read_text()).get("status")
        if status in FINISHED:
            raise ConfigError(RESUME, str(folder), f"the run finished (status {status}); "
                              "nothing to resume")
    return folder


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested config (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class ClientStates:
    """Every simulated client's ``Context.state``, by partition id (a checkpoint's part).

    Flower's engine keeps the contexts (`fedkd.flower_compat.SimulationNodes`); records are kept
    as plain values (`fedkd.records.record_dict_state`), bit for bit.
    """

    def __init__(self, engine: SimulationNodes) -> None:
        self.engine = engine

    def state_dict(self, nodes: Nodes) -> dict[str, Any]:  # noqa: ARG002 - keyed by partition
        """Partition id -> that client's state."""
        return {"by_partition": {p: record_dict_state(s) for p, s in self.engine.states().items()}}

    def load_state_dict(self, state: dict[str, Any], nodes: Nodes) -> None:  # noqa: ARG002
        """Put every client's state back (before its first message)."""
        self.engine.set_states({int(p): record_dict_from_state(s)
                                for p, s in state["by_partition"].items()})


class Checkpointing:
    """A simulation's checkpoints: `plan` (None when it neither checkpoints nor resumes) for
    `fedkd.server.run_strategy`; entered around ``run_simulation`` (the engine's contexts are
    captured while inside).

    Resuming (``resume=``: the recorder writes into that run's folder) reads its checkpoint here,
    before Ray starts; a folder without one starts again from round 1. `engine`: where the
    clients' contexts live (default: Flower's simulation engine, captured while inside).
    """

    def __init__(self, run: PreparedRun, recorder: Recorder,
                 engine: SimulationNodes | None = None) -> None:
        self.plan: CheckpointPlan | None = None
        self._stack = ExitStack()
        every, path = checkpoint_every(run.cfg), recorder.out_dir / CHECKPOINT
        meta = {"partition_hash": run.data.partition_hash,
                "public_fingerprint": run.data.public_fingerprint}
        resume = None
        if run.cfg.get(RESUME) is not None:
            if path.is_file():
                resume = load_checkpoint(path)
                if resume["meta"] != meta:
                    raise ConfigError(RESUME, str(recorder.out_dir), f"its checkpoint was made "
                                      f"on other data ({resume['meta']}, now {meta})")
                recorder.info["resumed_from_round"] = int(resume["round"])
            else:
                log.warning("resume: %s has no checkpoint: the run starts again from round 1",
                            recorder.out_dir)
        self._engine: SimulationNodes | None = None  # captured also without checkpoints:
        try:  # the final models are read from it (`client_states`)
            require_supported_flower()
        except UnsupportedFlowerError as err:
            if resume is not None:
                raise
            if every:
                log.warning("no checkpoints: %s", err)
            return
        self._engine = engine or SimulationNodes()
        if not every and resume is None:
            return
        self.plan = CheckpointPlan(
            path=path, every=every, nodes=lambda: Nodes(self._engine.partition_of()),
            parts={"recorder": recorder, "clients": ClientStates(self._engine)},
            resume=resume, meta=meta)

    def engine_partitions(self) -> Callable[[], dict[int, int]] | None:
        """Node id -> partition id as the engine assigned them (None: not captured)."""
        return None if self._engine is None else self._engine.known

    def client_states(self) -> dict[int, Any] | None:
        """Partition id -> every client's ``Context.state`` now (None: not captured)."""
        return None if self._engine is None else self._engine.states()

    def __enter__(self) -> CheckpointPlan | None:
        if self._engine is not None:
            self._stack.enter_context(capture_simulation_nodes(self._engine))
        return self.plan

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
