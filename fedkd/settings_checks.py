"""Checks of the run settings' values as they arrive over the wire (`fedkd.settings`): plain
types only, every key known, numbers finite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any

from fedkd.errors import ConfigError, is_int, is_number, require_keys

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
SERVER_ONLY_DATA_KEYS = ("client_sizes", "class_histograms")
"""Per-partition facts the server checks replies against; they never travel (`to_json`)."""
OPTIONAL_DATA_KEYS = ("normalize", "public_recipe", *SERVER_ONLY_DATA_KEYS)
RECIPE_KEYS = ("name", "args", "test_fraction", "public_size", "seed")


def refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _ints(value: object, low: int, empty: bool = True) -> bool:
    return _list(value) and (empty or bool(value)) and all(is_int(v) and v >= low for v in value)


def check_names(value: object, what: str, allowed: list[str], empty: bool) -> None:
    ok = _list(value) and (empty or bool(value)) and all(isinstance(v, str) for v in value)
    if not ok or any(v not in allowed for v in value):
        raise ConfigError(what, value, f"must be a {'' if empty else 'non-empty '}list of names "
                                       f"from {allowed}")


def check_keys(raw: Mapping[str, Any], kind: type, what: str) -> None:
    """Refuse keys a dataclass does not have, and missing required ones."""
    names = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind)
                if f.default is MISSING and f.default_factory is MISSING}
    require_keys(what, raw, names)
    if missing := sorted(required - set(raw)):
        raise ConfigError(f"{what} key(s) {missing} missing")


def check_data(data: object) -> None:
    """`ClientSettings.data`: exactly `DATA_KEYS`, each of its type."""
    if not isinstance(data, Mapping):
        raise ConfigError("settings.data", data, "must be a mapping")
    require_keys("settings.data", data, DATA_KEYS)
    if missing := sorted(set(DATA_KEYS) - set(OPTIONAL_DATA_KEYS) - set(data)):
        raise ConfigError(f"settings.data key(s) {missing} missing")
    checks = {
        "cache_dir": lambda v: isinstance(v, str),
        "num_classes": lambda v: is_int(v) and v >= 1,
        "input_shape": lambda v: _ints(v, 1, empty=False),
        "public_fingerprint": lambda v: isinstance(v, str),
        "partition_hash": lambda v: isinstance(v, str),
        "num_public": lambda v: is_int(v) and v >= 0,
        "num_test": lambda v: is_int(v) and v >= 0,
        "client_sizes": lambda v: _ints(v, 0),
        "class_histograms": lambda v: _list(v) and all(_ints(row, 0) for row in v),
        "normalize": lambda v: isinstance(v, str),
        "public_recipe": lambda v: v is None or _recipe_ok(v),
    }
    for key, value in data.items():
        if not checks[key](value):
            raise ConfigError(f"settings.data.{key}", value, f"must be {DATA_KEYS[key]}")


def _recipe_ok(recipe: object) -> bool:
    """An embedded public set's recipe (`fedkd.data.public.embedded_recipe`): plain values only."""
    if not isinstance(recipe, Mapping) or set(recipe) - set(RECIPE_KEYS) or "name" not in recipe:
        return False
    args = recipe.get("args") or {}
    plain_args = isinstance(args, Mapping) and all(
        isinstance(k, str) and not k.startswith("_")
        and (isinstance(v, str | bool) or is_number(v)) for k, v in args.items())
    optional_number = all(recipe.get(k) is None or is_number(recipe[k])
                          for k in ("test_fraction", "public_size"))
    return (isinstance(recipe["name"], str) and plain_args and optional_number
            and is_int(recipe.get("seed", 0)) and recipe.get("seed", 0) >= 0)
