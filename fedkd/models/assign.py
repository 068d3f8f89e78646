"""Assign a model architecture to each client partition."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from numbers import Integral
from typing import Any

from fedkd.errors import ConfigError
from fedkd.models._common import plain_mapping


def _partition_id(key: Any, num_clients: int) -> int:
    """Parse a ``clients`` key (int or decimal string) and check it is in ``[0, num_clients)``."""
    if isinstance(key, Integral) and not isinstance(key, bool):
        pid = int(key)
    elif isinstance(key, str) and key.strip().lstrip("-").isdigit():
        pid = int(key)
    else:
        raise ConfigError(f"model.clients/roles key {key!r} must be a partition id (int)")
    if not 0 <= pid < num_clients:
        raise ConfigError(f"model.clients/roles key {key!r} is out of range: partition ids are 0..{num_clients - 1}")
    return pid


def assign_models(model_cfg: Mapping, num_clients: int, homogeneous: bool = False) -> list[tuple[str, dict]]:
    """Return ``(arch_name, spec)`` for each partition id ``0 .. num_clients-1``.

    Parameters
    ----------
    model_cfg : mapping
        ``archs`` (name -> model spec), ``cycle`` (arch names cycled over partition ids) and optional
        ``clients`` (partition id -> arch name, overriding the cycle).
    num_clients : int
        Number of partitions.
    homogeneous : bool
        Give every client ``cycle[0]`` (the ``clients`` map is still validated, but not applied).

    Returns
    -------
    list of (str, dict)
        One entry per partition id; each spec is a fresh plain dict, safe to modify.
    """
    cfg = plain_mapping(model_cfg, "model config")
    if isinstance(num_clients, bool) or not isinstance(num_clients, Integral) or num_clients < 1:
        raise ConfigError(f"num_clients={num_clients!r} must be a positive int")
    archs = plain_mapping(cfg.get("archs"), "model.archs")
    for name, spec in archs.items():
        if not isinstance(spec, Mapping) or not isinstance(spec.get("_target_"), str):
            raise ConfigError(f"model.archs.{name}={spec!r} must be a mapping with a '_target_' string")
    known = sorted(archs)
    cycle = cfg.get("cycle")
    if not isinstance(cycle, (list, tuple)) or not cycle:
        raise ConfigError(f"model.cycle={cycle!r} must be a non-empty list of arch names from {known}")
    clients = plain_mapping(cfg.get("clients") or {}, "model.clients")
    overrides = {_partition_id(key, num_clients): name for key, name in clients.items()}
    for name in [*cycle, *overrides.values()]:
        if name not in archs:
            raise ConfigError(f"model arch {name!r} is unknown; known archs: {known}")
    names = [cycle[0] if homogeneous else overrides.get(pid, cycle[pid % len(cycle)]) for pid in range(num_clients)]
    return [(name, copy.deepcopy(archs[name])) for name in names]


ROLES = ("student", "teacher")


def assign_roles(model_cfg: Mapping, num_clients: int) -> list[str]:
    """Role per partition id from ``model.roles`` (partition id -> role); default ``student``.

    A ``teacher`` trains on its private data and answers logits but never digests soft targets
    (the "big teacher, small student" setting); a ``student`` does both.
    """
    roles = ["student"] * num_clients
    for key, role in dict(model_cfg.get("roles") or {}).items():
        if role not in ROLES:
            raise ConfigError(f"model.roles.{key}={role!r} is not a role; allowed: {list(ROLES)}")
        roles[_partition_id(key, num_clients)] = role
    return roles
