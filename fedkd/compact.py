"""Per-partition lists as a short cycle plus exceptions, so a document's size does not grow with
the number of partitions (the run settings a message carries: `fedkd.settings`).

``["a", "b", "a", "b", "t"]`` is ``{"n": 5, "cycle": ["a", "b"], "except": {"4": "t"}}``: entry
i is ``except[str(i)]`` if given, else ``cycle[i % len(cycle)]``. `compact` picks the period
(1 to `MAX_PERIOD`) that gives the fewest entries (cycle plus exceptions), the shortest on a
tie; `expand` is its inverse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedkd.errors import ConfigError, is_int

MAX_PERIOD = 64
"""Longest cycle `compact` tries."""
MAX_ENTRIES = 10_000_000
"""Most entries `expand` builds (a document from the wire naming more is refused)."""


def compact(values: Sequence[str]) -> dict[str, Any]:
    """The shortest cycle-plus-exceptions form of `values` (see the module docstring)."""
    values = list(values)
    n = len(values)
    best: tuple[int, list[str], dict[str, str]] | None = None
    for period in range(1, min(n, MAX_PERIOD) + 1):
        cycle = values[:period]
        exceptions = {str(i): v for i, v in enumerate(values) if v != cycle[i % period]}
        if best is None or period + len(exceptions) < len(best[1]) + len(best[2]):
            best = (period, cycle, exceptions)
        if not exceptions:
            break
    if best is None:
        return {"n": 0, "cycle": [], "except": {}}
    return {"n": n, "cycle": best[1], "except": best[2]}


def expand(form: object, what: str) -> list[str]:
    """The list a `compact` form describes (a plain list passes as it is).

    Raises ConfigError naming `what` for a malformed form: ``n`` not an int in
    ``0..MAX_ENTRIES``, an empty cycle for ``n > 0``, non-string names, or exception keys that
    are not partition ids below ``n``."""
    if isinstance(form, list):
        return form
    if not isinstance(form, Mapping) or set(form) != {"n", "cycle", "except"}:
        raise ConfigError(what, form, "must be a list, or {n, cycle, except}")
    n, cycle, exceptions = form["n"], form["cycle"], form["except"]
    if not is_int(n) or not 0 <= n <= MAX_ENTRIES:
        raise ConfigError(f"{what}.n", n, f"must be an int in 0..{MAX_ENTRIES}")
    if not isinstance(cycle, list) or (n and not cycle) or len(cycle) > max(n, 1) \
            or not all(isinstance(v, str) for v in cycle):
        raise ConfigError(f"{what}.cycle", cycle, "must be a non-empty list of names (at most n)")
    if not isinstance(exceptions, Mapping) or not all(
            isinstance(k, str) and k.isdigit() and int(k) < n and isinstance(v, str)
            for k, v in exceptions.items()):
        raise ConfigError(f"{what}.except", exceptions,
                          f"must map partition ids 0..{n - 1} (as strings) to names")
    values = [cycle[i % len(cycle)] for i in range(n)] if n else []
    for key, value in exceptions.items():
        values[int(key)] = value
    return values


def brief(values: Sequence[Any], limit: int = 12) -> str:
    """A list for a log line: whole up to `limit` items, else its head and tail and its length
    (``[0, 1, 2, 3, 4, 5, ..., 998, 999] (1000 items)``): a run of 10,000 clients logs one line,
    not 10,000 numbers."""
    items = list(values)
    if len(items) <= limit:
        return str(items)
    head, tail = items[: limit - 2], items[-2:]
    return f"[{', '.join(map(str, head))}, ..., {', '.join(map(str, tail))}] ({len(items)} items)"
