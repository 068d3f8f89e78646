"""Optimizers a client builds from settings that arrive over the wire, from an allowlist only.

The optimizer spec keeps the Hydra config form, ``{"_target_": "torch.optim.Adam", "lr": 0.01}``,
but nothing is instantiated by Hydra and nothing is imported: ``_target_`` must be
``torch.optim.<Name>`` with ``<Name>`` in `OPTIMIZERS`, and every other key must be an argument of
that optimizer (checked against its signature) with a plain value of the kind its default has:

- a boolean where the default is a boolean (``amsgrad``, ``nesterov``, ``maximize``, ...);
- a boolean or null where the default is null (``foreach``, ``fused``);
- a finite number (not a boolean) where the default is a number (``lr``, ``momentum``, ...);
- a flat list of finite numbers, as long as the default tuple (``betas``, ``etas``, ...).

Anything else (a nested mapping or ``_target_``, a string, an unknown argument, NaN) raises
`fedkd.errors.ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import torch

from fedkd.errors import ConfigError

PREFIX = "torch.optim."
OPTIMIZERS = (
    "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "NAdam", "RAdam",
    "RMSprop", "Rprop", "SGD",
)
"""`torch.optim` classes a spec may name (LBFGS needs a closure, SparseAdam sparse gradients,
Muon matrix parameters only: none fits a client's training loop)."""

_WHERE = "distill.optimizer"
HINTS = {
    "lr": "a number >= 0", "eps": "a number >= 0", "weight_decay": "a number >= 0",
    "momentum": "a number >= 0", "lr_decay": "a number >= 0", "momentum_decay": "a number >= 0",
    "betas": "two numbers in [0, 1)", "rho": "a number in [0, 1]",
}
"""What the allowlisted optimizers accept for their common arguments, for messages only: torch
decides (`_dry_run`), the hint says what it wants."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@lru_cache(maxsize=None)
def _arguments(name: str) -> dict[str, Any]:
    """Keyword arguments of an allowlisted optimizer and their defaults (``params`` excluded)."""
    if name not in OPTIMIZERS:  # never look up a name that is not allowlisted
        raise ConfigError(f"{_WHERE}._target_", name, "is not an allowed optimizer")
    signature = inspect.signature(getattr(torch.optim, name))
    return {p.name: p.default for p in signature.parameters.values()
            if p.name != "params" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_value(name: str, key: str, value: object, default: object) -> object:
    """`value` for argument `key` if it has the kind of its default, else ConfigError."""
    field = f"{_WHERE}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        allowed = "true or false"
    elif default is None:
        if value is None or isinstance(value, bool):
            return value
        allowed = "true, false or null"
    elif isinstance(default, tuple):
        if (isinstance(value, list | tuple) and len(value) == len(default)
                and all(_is_number(v) for v in value)):
            return tuple(value)
        allowed = f"a flat list of {len(default)} finite numbers"
    else:
        if _is_number(value):
            return value
        allowed = "a finite number"
    raise ConfigError(field, value, f"must be {allowed} ({PREFIX}{name})")


def check_optimizer(spec: object) -> tuple[str, dict[str, Any]]:
    """Validate an optimizer spec; return the allowlisted class name and its keyword arguments.

    Parameters
    ----------
    spec : mapping
        ``{"_target_": "torch.optim.<Name>", **kwargs}`` with plain values (see the module doc).

    Raises
    ------
    ConfigError
        The spec names no allowlisted optimizer, has an unknown argument or a value of the wrong
        kind, or torch refuses the values (e.g. a negative ``lr``).
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(_WHERE, spec, "must be a mapping with a '_target_'")
    target = spec.get("_target_")
    allowed = ", ".join(PREFIX + n for n in OPTIMIZERS)
    name = target[len(PREFIX):] if isinstance(target, str) and target.startswith(PREFIX) else None
    if name not in OPTIMIZERS:
        raise ConfigError(f"{_WHERE}._target_", target, f"must be one of: {allowed}")
    arguments = _arguments(name)
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "_target_":
            continue
        if not isinstance(key, str) or key not in arguments:
            raise ConfigError(f"{_WHERE}.{key}", value, f"is not an argument of {PREFIX}{name}; "
                                                        f"options: {sorted(arguments)}")
        kwargs[key] = _check_value(name, key, value, arguments[key])
    _dry_run(name, kwargs)
    return name, kwargs


def _refusal(name: str, kwargs: Mapping[str, Any]) -> str | None:
    """Why torch refuses to build optimizer `name` with `kwargs` (None: it builds)."""
    try:
        getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)], **kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def _dry_run(name: str, kwargs: Mapping[str, Any]) -> None:
    """Let torch check the values (ranges, combinations) on one throw-away parameter.

    A refusal names the first argument torch refuses on its own, with what it accepts; one that
    only a combination of arguments causes names them all.
    """
    why = _refusal(name, kwargs)
    if why is None:
        return
    for key, value in kwargs.items():
        alone = _refusal(name, {key: value})
        if alone is not None:
            hint = f"must be {HINTS[key]}; " if key in HINTS else ""
            raise ConfigError(f"{_WHERE}.{key}", value, f"{hint}{PREFIX}{name} says: {alone}")
    raise ConfigError(_WHERE, dict(kwargs), f"{PREFIX}{name} refuses this combination: {why}")


def build_optimizer(spec: Mapping[str, Any], params: Iterable[torch.nn.Parameter]
                    ) -> torch.optim.Optimizer:
    """The allowlisted `torch.optim` optimizer a spec names, over `params`.

    Parameters
    ----------
    spec : mapping
        ``{"_target_": "torch.optim.<Name>", **kwargs}``; validated by `check_optimizer`.
    params : iterable of Parameter
        The parameters to optimise (e.g. ``model.parameters()``).
    """
    name, kwargs = check_optimizer(spec)
    return getattr(torch.optim, name)(params, **kwargs)


def scheduled_lr(lr: float, decay: float, rounds_done: int) -> float:
    """``lr * decay**rounds_done``: the rate of a client's round after `rounds_done` earlier ones
    (a per-client ``torch.optim.lr_scheduler.ExponentialLR(gamma=decay)`` stepped once a round)."""
    return float(lr * decay ** rounds_done)


def schedule_lr(optimizer: torch.optim.Optimizer, decay: float, rounds_done: int) -> None:
    """Set every parameter group to `scheduled_lr` of the optimizer's configured rate (its
    ``defaults["lr"]``: the spec's ``lr`` or the class default)."""
    lr = scheduled_lr(optimizer.defaults["lr"], decay, rounds_done)
    for group in optimizer.param_groups:
        group["lr"] = lr
