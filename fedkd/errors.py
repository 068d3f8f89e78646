"""Exceptions shared across fedkd, and the one format of a bad configuration value.

A check of a configuration value raises ``ConfigError(key, value, allowed)``; its message is
``<key>=<value>: <what is allowed>``, for example::

    aggregator.fraction=0.7: must be a number in [0, 0.5)

and every fedkd command prints it as one line, ``configuration error: <message>`` (`error_line`),
before Ray or Flower starts. A component that does not know where its options sit in the config
names them alone (``fraction``); whoever builds it from the config puts them in place
(`ConfigError.within`, `fedkd.checks`). The ``require_*`` helpers below are the checks of plain
values; ``ConfigError(message)`` (one argument) remains for problems that are no single value
(a missing file, two values that disagree).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

PREFIX = "configuration error"
"""What every fedkd command prints before a `ConfigError`'s message."""

_NO_VALUE = object()
_MAX_SHOWN = 300  # characters of a value shown in a message (one line stays readable)


class ConfigError(ValueError):
    """A configuration value or input file is invalid.

    Parameters
    ----------
    key : str
        The value's key as the user writes it (``distill.optimizer.lr``, ``--rounds``); with no
        `value`, the whole message (a problem that is no single value).
    value : object, optional
        The value given.
    allowed : str
        What is allowed, e.g. ``must be an int >= 1``.
    """

    def __init__(self, key: str, value: object = _NO_VALUE, allowed: str = "") -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(str(self))

    @property
    def has_value(self) -> bool:
        """Whether the error names one value (``key=value: allowed``) rather than a message."""
        return self.value is not _NO_VALUE

    def __str__(self) -> str:
        if not self.has_value:
            return self.key
        return f"{self.key}={show(self.value)}: {self.allowed}"

    def __reduce__(self) -> tuple:  # pickled (Ray, Flower): the sentinel does not travel
        if not self.has_value:
            return type(self), (self.key,)
        return type(self), (self.key, self.value, self.allowed)

    def within(self, where: str | None) -> ConfigError:
        """The same error with its key under `where` (``fraction`` -> ``aggregator.fraction``);
        a message without a value is prefixed with ``<where>: ``."""
        if not where:
            return self
        if not self.has_value:
            err = ConfigError(f"{where}: {self.key}")
        else:
            err = ConfigError(f"{where}.{self.key}", self.value, self.allowed)
        err.__cause__ = self.__cause__
        return err


def show(value: object) -> str:
    """A value as a message shows it: ``true``/``false``/``null`` as in yaml, strings quoted."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, Mapping):
        text = str(dict(value))
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


def error_line(err: BaseException) -> str:
    """``configuration error: <message>``, the first line of the message only."""
    text = str(err).strip()
    return f"{PREFIX}: {text.splitlines()[0] if text else type(err).__name__}"


def find_config_error(err: BaseException, also: tuple[type, ...] = ()) -> BaseException | None:
    """The `ConfigError` (or an error of the types `also`) behind `err`, following its causes."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (ConfigError, *also)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# --- checks of plain values ------------------------------------------------------------------------
def _bound(value: float) -> str:
    return str(value) if is_int(value) else f"{value:g}"


def _bounds(kind: str, low: float | None, high: float | None, low_open: bool, high_open: bool,
            null: bool) -> str:
    if low is not None and high is not None:
        text = (f"{kind} in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}"
                f"{')' if high_open else ']'}")
    elif low is not None:
        text = f"{kind} {'>' if low_open else '>='} {_bound(low)}"
    elif high is not None:
        text = f"{kind} {'<' if high_open else '<='} {_bound(high)}"
    else:
        text = kind
    return f"must be {text}{' or null' if null else ''}"


def _within(value: float, low: float | None, high: float | None, low_open: bool,
            high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def is_int(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def require_int(key: str, value: Any, low: int | None = None, high: int | None = None, *,
                null: bool = False) -> int | None:
    """`value` as an int in ``[low, high]`` (None when `null` allows it), else ConfigError."""
    if value is None and null:
        return None
    if is_int(value) and _within(value, low, high, False, False):
        return int(value)
    raise ConfigError(key, value, _bounds("an int", low, high, False, False, null))


def require_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                   low_open: bool = False, high_open: bool = False,
                   null: bool = False) -> float | None:
    """`value` as a finite float within the bounds (open ends excluded), else ConfigError."""
    if value is None and null:
        return None
    if is_number(value) and _within(value, low, high, low_open, high_open):
        return float(value)
    raise ConfigError(key, value, _bounds("a number", low, high, low_open, high_open, null))


def require_bool(key: str, value: Any) -> bool:
    """`value` if it is true or false, else ConfigError."""
    if isinstance(value, bool):
        return value
    raise ConfigError(key, value, "must be true or false")


def require_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices`, else ConfigError listing them."""
    choices = list(choices)
    if any(value == choice and type(value) is type(choice) for choice in choices):
        return value
    raise ConfigError(key, value, f"must be one of {choices}")


def require_keys(where: str, given: Mapping[str, Any], allowed: Iterable[str],
                 owner: str | None = None) -> None:
    """Refuse the first key of `given` that is not in `allowed`, naming the allowed ones."""
    allowed = sorted(allowed)
    for key, value in given.items():
        if key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            of = f" of {owner}" if owner else ""
            raise ConfigError(name, value, f"is not an option{of}; options: {allowed}")
