"""Run settings: everything a ClientApp needs, sent by the server with each message.

The server resolves the Hydra config once and ships this small JSON document in the message's
ConfigRecord, so a ClientApp needs nothing but its node config (in simulation, `partition-id`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from fedkd.errors import ConfigError
from fedkd.models.assign import ROLES
from fedkd.models.build import check_spec
from fedkd.optim import check_optimizer
from fedkd.protocol import SETTINGS_KEY

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
            _int(getattr(self, name), f"distill.{name}", low=1)
        if self.local_steps is not None:
            _int(self.local_steps, "distill.local_steps", low=1, allowed="an int >= 1 or null")
        for name in ("local_epochs", "warmup_epochs", "digest_epochs"):
            _int(getattr(self, name), f"distill.{name}", low=0)
        if not (_is_number(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"distill.alpha must be a number in [0, 1], got {self.alpha!r}")
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise ConfigError(f"distill.temperature must be a number > 0, got {self.temperature!r}")
        for name in ("profile", "share_class_counts", "revisit"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"distill.{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if not (_is_number(self.lr_decay) and 0.0 < self.lr_decay <= 1.0):
            raise ConfigError(f"distill.lr_decay must be a number in (0, 1], got {self.lr_decay!r}")
        check_optimizer(self.optimizer)


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

    def __post_init__(self) -> None:
        _check_data(self.data)
        if not isinstance(self.archs, Mapping) or not self.archs:
            raise ConfigError(f"settings.archs must be a non-empty mapping, got {self.archs!r}")
        for name, spec in self.archs.items():
            if not isinstance(name, str):
                raise ConfigError(f"settings.archs key {name!r} must be a string")
            check_spec(spec, f"settings.archs.{name}")
        _strings(self.assignment, "settings.assignment", sorted(self.archs), empty=False)
        _strings(self.roles, "settings.roles", list(ROLES), empty=True)
        if self.roles and len(self.roles) != len(self.assignment):
            raise ConfigError(f"settings.roles has {len(self.roles)} entries, settings.assignment "
                              f"{len(self.assignment)}; give one role per partition or none")
        if not isinstance(self.train, TrainSettings):
            raise ConfigError(f"settings.train must be TrainSettings, got {type(self.train)}")
        _int(self.seed, "settings.seed", low=0, high=MAX_SEED)
        _int(self.num_rounds, "settings.num_rounds", low=1)

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
        """Parse and check the JSON form; a malformed document raises ConfigError.

        Every field is type- and range-checked (see `__post_init__`, `TrainSettings`); NaN and
        infinities are refused anywhere, unknown or missing keys are named.
        """
        try:
            raw = json.loads(text, parse_constant=_refuse_constant)
            if not isinstance(raw, dict):
                raise ConfigError(f"the document must be a JSON object, got {type(raw).__name__}")
            _keys(raw, cls, "settings")
            if not isinstance(raw["train"], dict):
                raise ConfigError(f"settings.train must be an object, got {raw['train']!r}")
            _keys(raw["train"], TrainSettings, "distill")
            return cls(**{**raw, "train": TrainSettings(**raw["train"])})
        except (TypeError, ValueError, RecursionError) as err:  # ConfigError is a ValueError
            raise ConfigError(f"malformed {SETTINGS_KEY} in the message: {err}") from err

    def to_config(self) -> dict[str, str]:
        """The config entries carrying these settings (a message's ConfigRecord holds them)."""
        return {SETTINGS_KEY: self.to_json()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientSettings:
        """Read the settings from a message's config (a ConfigRecord or a plain mapping)."""
        if SETTINGS_KEY not in config:
            raise ConfigError(f"the message's config has no {SETTINGS_KEY!r} entry")
        text = config[SETTINGS_KEY]
        if not isinstance(text, str):
            raise ConfigError(f"the message's {SETTINGS_KEY!r} must be a JSON string, got "
                              f"{type(text).__name__}")
        return cls.from_json(text)


# --- checks of values that arrive over the wire ---------------------------------------------------
DATA_KEYS = {
    "cache_dir": "a string (simulation: the prepared data's folder)",
    "num_classes": "an int >= 1",
    "input_shape": "a non-empty list of ints >= 1",
    "public_fingerprint": "a string",
    "partition_hash": "a string",
    "num_public": "an int >= 0",
    "num_test": "an int >= 0",
    "client_sizes": "a list of ints >= 0",
    "class_histograms": "a list of lists of ints >= 0",
    "normalize": "a string (deployment: how the public set is normalised), optional",
    "public_recipe": "null or an embedded public set's recipe (deployment), optional",
}
"""Keys of `ClientSettings.data` (`fedkd.data.DataInfo` plus the deployment's two)."""
OPTIONAL_DATA_KEYS = ("normalize", "public_recipe")
RECIPE_KEYS = ("name", "args", "test_fraction", "public_size", "seed")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _int(value: object, what: str, low: int, high: int | None = None,
         allowed: str | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = allowed or (f"an int in [{low}, {high}]" if high is not None else
                              f"an int >= {low}")
        raise ConfigError(f"{what} must be {allowed}, got {value!r}")


def _list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _ints(value: object, low: int, empty: bool = True) -> bool:
    return _list(value) and (empty or bool(value)) and all(_is_int(v) and v >= low for v in value)


def _strings(value: object, what: str, allowed: list[str], empty: bool) -> None:
    ok = _list(value) and (empty or bool(value)) and all(isinstance(v, str) for v in value)
    if not ok or any(v not in allowed for v in value):
        raise ConfigError(f"{what} must be a {'' if empty else 'non-empty '}list of names from "
                          f"{allowed}, got {value!r}")


def _keys(raw: Mapping[str, Any], kind: type, what: str) -> None:
    """Refuse keys a dataclass does not have, and missing required ones."""
    names = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind)
                if f.default is MISSING and f.default_factory is MISSING}
    if unknown := sorted(map(str, set(raw) - names)):
        raise ConfigError(f"{what} key(s) {unknown} unknown; allowed: {sorted(names)}")
    if missing := sorted(required - set(raw)):
        raise ConfigError(f"{what} key(s) {missing} missing")


def _check_data(data: object) -> None:
    """`ClientSettings.data`: exactly `DATA_KEYS`, each of its type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"settings.data must be a mapping, got {data!r}")
    if unknown := sorted(map(str, set(data) - set(DATA_KEYS))):
        raise ConfigError(f"settings.data key(s) {unknown} unknown; allowed: {sorted(DATA_KEYS)}")
    if missing := sorted(set(DATA_KEYS) - set(OPTIONAL_DATA_KEYS) - set(data)):
        raise ConfigError(f"settings.data key(s) {missing} missing")
    checks = {
        "cache_dir": lambda v: isinstance(v, str),
        "num_classes": lambda v: _is_int(v) and v >= 1,
        "input_shape": lambda v: _ints(v, 1, empty=False),
        "public_fingerprint": lambda v: isinstance(v, str),
        "partition_hash": lambda v: isinstance(v, str),
        "num_public": lambda v: _is_int(v) and v >= 0,
        "num_test": lambda v: _is_int(v) and v >= 0,
        "client_sizes": lambda v: _ints(v, 0),
        "class_histograms": lambda v: _list(v) and all(_ints(row, 0) for row in v),
        "normalize": lambda v: isinstance(v, str),
        "public_recipe": lambda v: v is None or _recipe_ok(v),
    }
    for key, value in data.items():
        if not checks[key](value):
            raise ConfigError(f"settings.data.{key} must be {DATA_KEYS[key]}, got {value!r}")


def _recipe_ok(recipe: object) -> bool:
    """An embedded public set's recipe (`fedkd.data.public.embedded_recipe`): plain values only."""
    if not isinstance(recipe, Mapping) or set(recipe) - set(RECIPE_KEYS) or "name" not in recipe:
        return False
    args = recipe.get("args") or {}
    plain_args = isinstance(args, Mapping) and all(
        isinstance(k, str) and not k.startswith("_")
        and (isinstance(v, str | bool) or _is_number(v)) for k, v in args.items())
    optional_number = all(recipe.get(k) is None or _is_number(recipe[k])
                          for k in ("test_fraction", "public_size"))
    return (isinstance(recipe["name"], str) and plain_args and optional_number
            and _is_int(recipe.get("seed", 0)) and recipe.get("seed", 0) >= 0)
