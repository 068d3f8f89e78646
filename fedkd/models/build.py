"""Build a model from a config spec, allowing only fedkd's own model classes with plain arguments.

A spec may arrive over the network (`fedkd.settings.ClientSettings.archs`), so nothing in it is
imported or Hydra-instantiated: ``_target_`` must be one of the names in `MODEL_CLASSES`, and every
other key an argument of that class's constructor (checked against its signature) with a plain
value, a finite number, a boolean or a flat list of them (`check_spec`). Two keys describe the arch
instead: ``name`` and ``tap`` (`spec_tap`: the tap it offers to feature, relation and prototype
losses, default ``embedding``; `build_model` checks the model has it).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from fedkd.errors import ConfigError
from fedkd.models._common import plain_mapping
from fedkd.models.cnn import CNN1d, CNN2d
from fedkd.models.fedgen import FedGenCNN
from fedkd.models.mlp import MLP
from fedkd.models.mobilenet import MobileNet
from fedkd.models.resnet import ResNet
from fedkd.models.taps import EMBEDDING, check_tap
from fedkd.models.vit import ViT

log = logging.getLogger(__name__)

ALLOWED_PREFIX = "fedkd.models."
"""Targets name a class under this package: specs may arrive over the network."""

FAMILIES: tuple[type[nn.Module], ...] = (MLP, CNN2d, CNN1d, FedGenCNN, ResNet, MobileNet, ViT)
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    **{f"{ALLOWED_PREFIX}{cls.__name__}": cls for cls in FAMILIES},
    **{f"{cls.__module__}.{cls.__name__}": cls for cls in FAMILIES},  # fedkd.models.mlp.MLP
}
"""Every ``_target_`` a spec may name, and the class it stands for (the allowlist)."""

TAP = "tap"
"""Spec key (a string, not a constructor argument): the tap the arch offers to feature, relation and
prototype losses (`spec_tap`); one of the built model's ``tap_kinds``."""
NON_CONSTRUCTOR_KEYS = ("name", TAP)
"""Spec keys that describe the model but are not constructor arguments (a string); dropped."""
DP_COMPATIBLE = "dp_compatible"
"""Spec key (a boolean, not a constructor argument): true builds the model and then applies Opacus's
``ModuleValidator.fix`` (BatchNorm -> GroupNorm) and its strict validation (``privacy=dpsgd``,
`fedkd.dpsgd`), so every builder of the arch (client, reply guard, FedAvg's initial weights) agrees."""

DATA_ARGUMENTS = ("input_shape", "num_classes")
"""Constructor arguments that come from the data, never from a spec."""


def _hydra_keys(value: Any) -> list[str]:
    """Hydra control keys (``_args_``, ``_partial_``, a nested ``_target_``, ...) anywhere in a spec.

    Walks iteratively, so a deeply nested document cannot exhaust the stack.
    """
    found: list[str] = []
    stack: list[tuple[Any, bool]] = [(value, True)]
    while stack:
        item, top = stack.pop()
        if isinstance(item, Mapping):
            found += [k for k in item if isinstance(k, str) and k.startswith("_")
                      and not (top and k == "_target_")]
            stack += [(v, False) for v in item.values()]
        elif isinstance(item, list | tuple):
            stack += [(v, False) for v in item]
    return found


def _is_scalar(value: object) -> bool:
    """A boolean or a finite number."""
    return isinstance(value, bool) or (isinstance(value, int | float) and math.isfinite(value))


def resolve_target(spec: Mapping) -> type[nn.Module]:
    """Return the model class a spec names; refuse anything not in `MODEL_CLASSES`.

    Parameters
    ----------
    spec : mapping
        A model spec with a ``_target_`` such as ``"fedkd.models.CNN2d"``.
    """
    target = spec.get("_target_")
    cls = MODEL_CLASSES.get(target) if isinstance(target, str) else None
    if cls is None:
        allowed = sorted(f"{ALLOWED_PREFIX}{c.__name__}" for c in FAMILIES)
        raise ConfigError(f"model spec {dict(spec)!r}: _target_={target!r} is not a model class of "
                          f"fedkd.models; allowed: {allowed}")
    return cls


def check_spec(spec: Any, what: str = "model spec") -> tuple[type[nn.Module], dict[str, Any]]:
    """Validate a spec without building it; return its class and constructor keyword arguments.

    Parameters
    ----------
    spec : mapping
        ``{"_target_": "fedkd.models.<Family>", **hyperparams}``, optionally with ``name`` and
        ``tap`` strings.
    what : str
        How error messages name the spec (e.g. ``"archs.mlp"``).

    Raises
    ------
    ConfigError
        Hydra control keys (a nested ``_target_`` included), a target outside `MODEL_CLASSES`, an
        argument the constructor does not take, or a value that is not plain.
    """
    plain = plain_mapping(spec, what)
    if forbidden := _hydra_keys(plain):
        raise ConfigError(f"{what} {plain!r}: keys {forbidden} are not allowed (only a top-level '_target_')")
    cls = resolve_target(plain)
    params = inspect.signature(cls).parameters
    allowed = sorted(k for k in params if k not in DATA_ARGUMENTS)
    kwargs: dict[str, Any] = {}
    for key, value in plain.items():
        if key == "_target_":
            continue
        if key == DP_COMPATIBLE:
            if not isinstance(value, bool):
                raise ConfigError(f"{what} {plain!r}: {key}={value!r} must be true or false")
            continue
        if key in NON_CONSTRUCTOR_KEYS:
            if not isinstance(value, str):
                raise ConfigError(f"{what} {plain!r}: {key}={value!r} must be a string")
            continue
        if key not in allowed:
            raise ConfigError(f"{what} {plain!r}: {key!r} is not an argument of {cls.__name__}; "
                              f"allowed: {allowed} (input_shape and num_classes come from the data)")
        flat = isinstance(value, list | tuple) and all(_is_scalar(v) for v in value)
        if not (_is_scalar(value) or flat):
            raise ConfigError(f"{what} {plain!r}: {key}={value!r} must be a number, a boolean or a "
                              f"flat list of them")
        kwargs[key] = list(value) if flat else value
    return cls, kwargs


def build_model(spec: Mapping, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Instantiate the model a spec describes.

    Parameters
    ----------
    spec : mapping
        ``{"_target_": "fedkd.models.<Family>", **hyperparams}``, optionally with ``name`` (dropped)
        and ``tap`` (checked against the built model's taps).
    input_shape : sequence of int
        Shape of one example, without the batch dimension.
    num_classes : int
        Number of output logits.

    Raises
    ------
    ConfigError
        The spec fails `check_spec`, the family refuses the values or the input shape, or the
        model has no tap ``tap``.
    """
    cls, kwargs = check_spec(spec)
    try:
        model = cls(input_shape, num_classes, **kwargs)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"model spec {plain_mapping(spec, 'model spec')!r} could not be built "
                          f"for input {input_shape!r}: {exc}") from exc
    if spec.get(DP_COMPATIBLE):
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
        ModuleValidator.validate(model, strict=True)
    try:
        check_tap(model, spec_tap(spec))
    except ConfigError as exc:
        raise ConfigError(f"model spec {plain_mapping(spec, 'model spec')!r}: {exc}") from exc
    log.debug("built %s for input %s: %d parameters", cls.__name__, input_shape, count_parameters(model))
    return model


def spec_tap(spec: Mapping) -> str:
    """The tap a spec offers to feature, relation and prototype losses: its ``tap``, default
    ``embedding`` (every family has that one)."""
    plain = plain_mapping(spec, "model spec")
    tap = plain.get(TAP, EMBEDDING)
    if not isinstance(tap, str):
        raise ConfigError(f"model spec {plain!r}: {TAP}={tap!r} must be a string")
    return tap


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers such as BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
