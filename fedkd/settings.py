"""Run settings: everything a ClientApp needs, sent by the server with each message.

The server resolves the Hydra config once and ships this small JSON document in the message's
ConfigRecord, so a ClientApp needs nothing but its node config (in simulation, `partition-id`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping
from typing import Any

from fedkd.errors import ConfigError

from fedkd.protocol import SETTINGS_KEY


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation and distillation hyper-parameters of a client."""

    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "lr": 0.01}
    )
    """Hydra node of a `torch.optim` optimizer (the parameters are passed at build time)."""
    batch_size: int = 32
    """Mini-batch size for private data and transfer batches."""
    local_epochs: int = 1
    """Epochs on the private data in every round after the first ("revisit")."""
    local_steps: int | None = None
    """If set, exactly this many private mini-batches per later round instead of local_epochs."""
    warmup_epochs: int = 20
    """Epochs on the private data in a client's first round."""
    digest_epochs: int = 3
    """Epochs over the received soft targets ("digest")."""
    temperature: float = 3.0
    """Softmax temperature of the soft targets and the KD loss."""
    alpha: float = 0.8
    """Weight of the KD term while digesting; 1 - alpha weighs CE on private batches."""
    eval_every: int = 1
    """Evaluate the student on the test set every N rounds (and always in the last round)."""

    def local_budget(self, first_round: bool) -> dict[str, int | None]:
        """`revisit` keyword arguments for a client's first round (warm-up) or a later one."""
        if first_round:
            return {"epochs": self.warmup_epochs, "steps": None}
        return {"epochs": self.local_epochs, "steps": self.local_steps}

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name} must be >= 1, got {getattr(self, name)}")
        if self.local_steps is not None and self.local_steps < 1:
            raise ConfigError(f"distill.local_steps must be >= 1 or null, got {self.local_steps}")
        for name in ("local_epochs", "warmup_epochs", "digest_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        target = str(self.optimizer.get("_target_", ""))
        if not target.startswith("torch.optim."):
            raise ConfigError(
                f"distill.optimizer._target_ must name a torch.optim class, got {target!r}"
            )


@dataclass(frozen=True)
class ClientSettings:
    """What every client of a run shares: data description, architectures, training, seed."""

    data: dict[str, Any]
    """`fedkd.data.DataInfo.to_dict()` of the prepared data."""
    archs: dict[str, dict[str, Any]]
    """Architecture name -> model spec (a `fedkd.models` Hydra node)."""
    assignment: list[str]
    """Architecture name per partition id."""
    train: TrainSettings
    seed: int
    """Training seed; client `i` seeds with `seed + i`."""
    num_rounds: int
    roles: list[str] = field(default_factory=list)
    """Role per partition id (`student` or `teacher`); empty means every client is a student."""

    def role_of(self, partition_id: int) -> str:
        """A partition's role: teachers never digest soft targets."""
        return self.roles[partition_id] if self.roles else "student"

    def arch_of(self, partition_id: int) -> tuple[str, dict[str, Any]]:
        """Architecture name and spec of a partition."""
        if not 0 <= partition_id < len(self.assignment):
            raise ConfigError(
                f"partition-id {partition_id} is outside 0..{len(self.assignment) - 1}"
            )
        name = self.assignment[partition_id]
        return name, self.archs[name]

    def to_json(self) -> str:
        """Compact JSON form."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientSettings:
        """Parse the JSON form; a malformed document raises ConfigError."""
        try:
            raw = json.loads(text)
            return cls(**{**raw, "train": TrainSettings(**raw["train"])})
        except (TypeError, KeyError, json.JSONDecodeError) as err:
            raise ConfigError(f"malformed {SETTINGS_KEY} in the message: {err}") from err

    def to_config(self) -> dict[str, str]:
        """The config entries carrying these settings (a message's ConfigRecord holds them)."""
        return {SETTINGS_KEY: self.to_json()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientSettings:
        """Read the settings from a message's config (a ConfigRecord or a plain mapping)."""
        if SETTINGS_KEY not in config:
            raise ConfigError(f"the message's config has no {SETTINGS_KEY!r} entry")
        return cls.from_json(str(config[SETTINGS_KEY]))
