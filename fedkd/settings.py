"""Run settings: everything a ClientApp needs, sent by the server with each message.

The server resolves the Hydra config once and ships this small JSON document in the message's
ConfigRecord, so a ClientApp needs nothing but its node config (in simulation, `partition-id`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from fedkd.compact import compact, expand
from fedkd.errors import ConfigError, require_bool, require_int, require_number
from fedkd.dpsgd import DPSettings
from fedkd.losses.rounds import check_client_losses
from fedkd.models.assign import ROLES
from fedkd.models.build import check_spec
from fedkd.optim import check_optimizer
from fedkd.protocol import SETTINGS_KEY
from fedkd.settings_checks import (
    SERVER_ONLY_DATA_KEYS, check_data, check_keys, check_names, refuse_constant,
)

MAX_SEED = 2**63 - 1
"""Largest training seed (client ``i`` seeds torch with ``seed + i``)."""


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation and distillation hyper-parameters of a client."""

    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "lr": 0.01}
    )
    """``{"_target_": "torch.optim.<Name>", **plain kwargs}``; only `fedkd.optim.OPTIMIZERS`, built
    by `fedkd.optim.build_optimizer` (never Hydra-instantiated: it arrives over the wire)."""
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
    revisit: bool = True
    """A KD client revisits its private data after digesting (FedMD). False: once soft targets
    arrive, private data enters only through the digest's CE term (weight 1 - alpha), so a
    label-skewed client does not drift back to its own labels before it answers and is tested.
    Parameter-exchange clients (FedAvg) always train their local budget."""
    temperature: float = 3.0
    """Softmax temperature of the soft targets and the KD loss."""
    alpha: float = 0.5
    """Weight of the KD term while digesting; 1 - alpha weighs CE on private batches."""
    eval_every: int = 1
    """Evaluate the student on the test set every N rounds (and always in the last round)."""
    lr_decay: float = 1.0
    """Per-client exponential learning-rate decay: a client's k-th training round (k = 0, 1, ...)
    runs at ``lr * lr_decay**k``, as a per-user ``ExponentialLR(gamma=lr_decay)`` stepped once per
    round the client trains."""
    share_class_counts: bool = False
    """Clients send their private rows per class with their logits (class-aware aggregators such
    as `fedkd.aggregation.class_weighted` need them; it reveals each client's label histogram)."""
    profile: bool = False
    """Report each round's per-phase wall times (``time-<phase>-s`` metrics, `fedkd.timing`)."""
    losses: dict[str, dict[str, Any]] | None = None
    """The digest's loss terms by name with their options (`fedkd.losses.specs`: an allowlist,
    plain values); null is ``alpha * kd + (1 - alpha) * ce``. Private-row terms other than
    ``ce`` (``self_kd``, ``exits``, ``prototype``) also join the revisit's CE
    (`fedkd.losses.specs.revisit_losses`). Terms reading a teacher's features or attention are
    server-side only (FedDF's ``server_losses``)."""
    relation_rows: int = 0
    """> 0: clients send the cosine similarities of their tap between the first this many
    transfer rows of a round (all of them when fewer), with their logits
    (`fedkd.strategies.relational`; bytes grow with its square); 0: none."""
    relation_topk: int = 0
    """> 0: of each row's similarities only the k largest travel, with their columns (bytes
    grow with rows x k); 0: all of them."""
    prototype_dim: int = 0
    """> 0: clients send per-class means of their tap, projected to this width by a fixed seeded
    projection (`fedkd.strategies.fedproto`); 0: none."""

    def revisits(self, first_round: bool, digested: bool) -> bool:
        """Whether a KD client trains on its private data after this round's digest."""
        return self.revisit or first_round or not digested

    def local_budget(self, first_round: bool) -> dict[str, int | None]:
        """`revisit` keyword arguments for a client's first round (warm-up) or a later one."""
        if first_round:
            return {"epochs": self.warmup_epochs, "steps": None}
        return {"epochs": self.local_epochs, "steps": self.local_steps}

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_every"):
            require_int(f"distill.{name}", getattr(self, name), 1)
        require_int("distill.local_steps", self.local_steps, 1, null=True)
        for name in ("local_epochs", "warmup_epochs", "digest_epochs"):
            require_int(f"distill.{name}", getattr(self, name), 0)
        require_number("distill.alpha", self.alpha, 0.0, 1.0)
        require_number("distill.temperature", self.temperature, 0.0, low_open=True)
        for name in ("profile", "share_class_counts", "revisit"):
            require_bool(f"distill.{name}", getattr(self, name))
        require_number("distill.lr_decay", self.lr_decay, 0.0, 1.0, low_open=True)
        check_optimizer(self.optimizer)
        require_int("distill.relation_rows", self.relation_rows, 0, 4096)
        require_int("distill.relation_topk", self.relation_topk, 0, 4096)
        require_int("distill.prototype_dim", self.prototype_dim, 0, 4096)
        object.__setattr__(self, "losses", check_client_losses(self.losses, self.temperature))


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
    dpsgd: DPSettings | None = None
    """Example-level DP-SGD of every client (``privacy=dpsgd``, `fedkd.dpsgd`); None: off."""

    def __post_init__(self) -> None:
        check_data(self.data)
        if not isinstance(self.archs, Mapping) or not self.archs:
            raise ConfigError("settings.archs", self.archs, "must be a non-empty mapping")
        for name, spec in self.archs.items():
            if not isinstance(name, str):
                raise ConfigError("settings.archs", name, "keys must be strings")
            check_spec(spec, f"settings.archs.{name}")
        check_names(self.assignment, "settings.assignment", sorted(self.archs), empty=False)
        check_names(self.roles, "settings.roles", list(ROLES), empty=True)
        if self.roles and len(self.roles) != len(self.assignment):
            raise ConfigError(f"settings.roles has {len(self.roles)} entries, settings.assignment "
                              f"{len(self.assignment)}; give one role per partition or none")
        if not isinstance(self.train, TrainSettings):
            raise ConfigError("settings.train", type(self.train).__name__,
                              "must be TrainSettings")
        require_int("settings.seed", self.seed, 0, MAX_SEED)
        require_int("settings.num_rounds", self.num_rounds, 1)
        if self.dpsgd is not None and not isinstance(self.dpsgd, DPSettings):
            raise ConfigError("settings.dpsgd", type(self.dpsgd).__name__,
                              "must be DPSettings or None")
        if self.dpsgd is not None:  # DP-SGD's steps know CE and KD only, and share nothing else
            for key, off in (("losses", None), ("relation_rows", 0), ("prototype_dim", 0)):
                if getattr(self.train, key) != off:
                    raise ConfigError(f"distill.{key}", getattr(self.train, key),
                                      f"must be {'null' if off is None else off} with "
                                      "privacy=dpsgd")

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
        """The wire form, of a size independent of the number of partitions: compact JSON,
        ``assignment`` and ``roles`` as a cycle plus exceptions (`fedkd.compact`), without the
        server-only per-partition data facts (`SERVER_ONLY_DATA_KEYS`)."""
        doc = asdict(self)
        doc["data"] = {k: v for k, v in doc["data"].items() if k not in SERVER_ONLY_DATA_KEYS}
        doc["assignment"] = compact(self.assignment)
        doc["roles"] = compact(self.roles) if self.roles else []
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientSettings:
        """Parse and check the JSON form; a malformed document raises ConfigError.

        Every field is type- and range-checked (see `__post_init__`, `TrainSettings`); NaN and
        infinities are refused anywhere, unknown or missing keys are named.
        """
        try:
            raw = json.loads(text, parse_constant=refuse_constant)
            if not isinstance(raw, dict):
                raise ConfigError(f"the document must be a JSON object, got {type(raw).__name__}")
            check_keys(raw, cls, "settings")
            if not isinstance(raw["train"], dict):
                raise ConfigError("settings.train", raw["train"], "must be an object")
            check_keys(raw["train"], TrainSettings, "distill")
            dpsgd = raw.get("dpsgd")
            if dpsgd is not None:
                if not isinstance(dpsgd, dict):
                    raise ConfigError("settings.dpsgd", dpsgd, "must be an object or null")
                check_keys(dpsgd, DPSettings, "privacy")
                dpsgd = DPSettings(**dpsgd)
            return cls(**{**raw, "train": TrainSettings(**raw["train"]), "dpsgd": dpsgd,
                          "assignment": expand(raw["assignment"], "settings.assignment"),
                          "roles": expand(raw.get("roles", []), "settings.roles")})
        except (TypeError, ValueError, RecursionError) as err:  # ConfigError is a ValueError
            raise ConfigError(f"malformed {SETTINGS_KEY} in the message: {err}") from err

    def to_config(self) -> dict[str, str]:
        """The config entries carrying these settings (a message's ConfigRecord holds them)."""
        return {SETTINGS_KEY: self.to_json()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientSettings:
        """Read the settings from a message's config (a ConfigRecord or a plain mapping).

        A document parsed once is not parsed again in this process (`parse_settings`)."""
        if SETTINGS_KEY not in config:
            raise ConfigError(f"the message's config has no {SETTINGS_KEY!r} entry")
        text = config[SETTINGS_KEY]
        if not isinstance(text, str):
            raise ConfigError(f"the message's {SETTINGS_KEY!r} must be a JSON string, got "
                              f"{type(text).__name__}")
        return parse_settings(text)


@lru_cache(maxsize=8)
def parse_settings(text: str) -> ClientSettings:
    """`ClientSettings.from_json`, memoised: every round of every client in a process reads the
    same document (treat the result as read-only)."""
    return ClientSettings.from_json(text)
