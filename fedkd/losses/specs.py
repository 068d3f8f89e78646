"""The loss of a run from its config: ``distill.losses``, a mapping of term names to options.

The mapping travels to clients inside the run settings, so it is data from the wire: terms come
from the allowlist `LOSS_TERMS` by name (no ``_target_``, no import), options are plain values
and each must be a parameter of its term's class::

    losses:                  # null: alpha * kd + (1 - alpha) * ce (distill.alpha, distill.temperature)
      kd: {weight: 0.5}      # temperature defaults to distill.temperature
      ce: {weight: 0.5}
      relation: {weight: 1.0}

`check_losses` validates the mapping and returns it plain and complete; `build_losses` makes the
`WeightedSum`, its terms in the mapping's order.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedkd.aggregation import check_temperature
from fedkd.errors import ConfigError, require_keys, require_number
from fedkd.losses.feature import AttentionTransfer, AttentionWeightsLoss, HintLoss
from fedkd.losses.relation import PrototypeLoss, RelationMatch, RKDAngle, RKDDistance, SimilarityPreserving
from fedkd.losses.relation_kd import RelationKD
from fedkd.losses.response import CELoss, KDLoss, WeightedSum, distill_loss
from fedkd.losses.self_distill import ExitDistill, SnapshotKD

logger = logging.getLogger(__name__)

WHERE = "distill.losses"
"""Where the mapping sits in the run config (the key every error names)."""

LOSS_TERMS: dict[str, type[nn.Module]] = {
    "kd": KDLoss,
    "ce": CELoss,
    "hint": HintLoss,
    "attention": AttentionTransfer,
    "attention_weights": AttentionWeightsLoss,
    "rkd_distance": RKDDistance,
    "rkd_angle": RKDAngle,
    "similarity": SimilarityPreserving,
    "relation": RelationMatch,
    "relation_kd": RelationKD,
    "prototype": PrototypeLoss,
    "self_kd": SnapshotKD,
    "exits": ExitDistill,
}
"""Every term a config may name, and its class."""

_PLAIN = (bool, int, float, str)


def _from_dims(cls: type[nn.Module]) -> dict[str, str]:
    """Constructor parameters of `cls` filled from `build_losses`'s ``dims`` (HintLoss's widths)."""
    return dict(getattr(cls, "from_dims", {}))


def term_options(cls: type[nn.Module]) -> list[str]:
    """The options a config may give the term `cls`: ``weight`` and its constructor's parameters
    (those filled from ``dims`` excepted)."""
    skip = _from_dims(cls)
    params = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]
    return ["weight", *params]


def _build(cls: type[nn.Module], kwargs: Mapping[str, Any], where: str) -> nn.Module:
    """``cls(**kwargs)``, its refusals named under `where`; the global RNG left as it was (a
    projector's initialisation draws from it)."""
    try:
        with torch.random.fork_rng(devices=[]):
            return cls(**kwargs)
    except ConfigError as err:
        raise err.within(where) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} refuses its options: {err}") from None


def check_losses(spec: Mapping[str, Any] | None, temperature: float) -> dict[str, dict[str, Any]] | None:
    """Validate ``distill.losses``; return it as plain dicts, every term's weight and temperature
    filled in (None stays None: the default ``alpha * kd + (1 - alpha) * ce``).

    Parameters
    ----------
    spec : mapping or None
        Term name (a key of `LOSS_TERMS`) -> options: ``weight`` (a finite number >= 0, default 1)
        and parameters of the term's class, plain values; null options are ``{}``, a null
        ``temperature`` is `temperature`.
    temperature : float
        ``distill.temperature``: the temperature of terms that take one and do not set it.

    Raises
    ------
    ConfigError
        One line, ``distill.losses.<name>.<key>=<value>: <what is allowed>``: an unknown term
        (``_target_`` included), an option the term does not take, a value that is not plain or not
        allowed, or no term of non-zero weight.
    """
    if spec is None:
        return None
    try:
        temperature = check_temperature(temperature)
    except ConfigError as err:
        raise err.within("distill") from None
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(WHERE, spec, "must be a mapping of loss terms to their options "
                                       "(e.g. {kd: {weight: 0.5}, ce: {weight: 0.5}}), or null")
    for name, options in spec.items():
        if name not in LOSS_TERMS:
            raise ConfigError(f"{WHERE}.{name}", options, f"is not a loss term; terms: {sorted(LOSS_TERMS)}")
    checked: dict[str, dict[str, Any]] = {}
    for name, options in spec.items():
        where = f"{WHERE}.{name}"
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            raise ConfigError(where, options, "must be a mapping of options (weight, ...) or null")
        cls = LOSS_TERMS[name]
        allowed = term_options(cls)
        require_keys(where, options, allowed, owner=name)
        for key, value in options.items():
            if value is not None and not isinstance(value, _PLAIN):
                raise ConfigError(f"{where}.{key}", value, "must be a plain value (a number, a string, "
                                                          "true/false or null)")
        weight = require_number(f"{where}.weight", options.get("weight", 1.0), 0.0)
        kwargs = {key: value for key, value in options.items() if key != "weight"}
        if "temperature" in allowed and kwargs.get("temperature") is None:
            kwargs["temperature"] = temperature  # unset or null: distill.temperature
        _build(cls, {**kwargs, **{param: 1 for param in _from_dims(cls)}}, where)
        checked[name] = {"weight": weight, **kwargs}
    if not any(options["weight"] for options in checked.values()):
        raise ConfigError(WHERE, spec, "needs at least one term of non-zero weight")
    return checked


def build_losses(spec: Mapping[str, Any] | None, *, alpha: float, temperature: float,
                 dims: Mapping[str, int] | None = None) -> WeightedSum:
    """The run's loss: ``sum_i weight_i * term_i`` of ``distill.losses`` (`check_losses` first).

    Parameters
    ----------
    spec : mapping or None
        ``distill.losses``; None gives exactly ``distill_loss(alpha, temperature)``.
    alpha : float
        ``distill.alpha``, used only when `spec` is None.
    temperature : float
        ``distill.temperature``, the default of every term that takes one.
    dims : mapping, optional
        ``{"student": ..., "teacher": ...}`` feature widths, for terms whose projector depends on them
        (``hint``); only where a teacher model with features is at hand (server side).
    """
    if spec is None:
        return distill_loss(alpha, temperature)
    terms = []
    for name, options in check_losses(spec, temperature).items():
        cls = LOSS_TERMS[name]
        kwargs = {key: value for key, value in options.items() if key != "weight"}
        from_dims = _from_dims(cls)
        if from_dims and (dims is None or any(key not in dims for key in from_dims.values())):
            raise ConfigError(f"{WHERE}.{name}", spec[name],
                              f"{name} needs a teacher with features: the student's and the teacher's "
                              f"feature widths (dims {sorted(from_dims.values())}), known where a teacher "
                              "model is (server side)")
        kwargs.update({param: dims[key] for param, key in from_dims.items()})
        try:
            term = cls(**kwargs)
        except ConfigError as err:
            raise err.within(f"{WHERE}.{name}") from None
        terms.append((options["weight"], term))
    loss = WeightedSum(terms)
    logger.debug("loss: %s", loss)
    return loss
