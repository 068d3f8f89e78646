"""Build a model from a config spec, allowing only fedkd's own model classes."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import hydra.utils
from torch import nn

from fedkd.errors import ConfigError
from fedkd.models._common import plain_mapping

log = logging.getLogger(__name__)

ALLOWED_PREFIX = "fedkd.models."
"""Targets must name a class under this package: specs may arrive over the network."""

NON_CONSTRUCTOR_KEYS = ("name",)
"""Spec keys that describe the model but are not constructor arguments; dropped before instantiation."""


def _hydra_keys(value: Any, top: bool = True) -> list[str]:
    """Hydra control keys (``_args_``, ``_partial_``, a nested ``_target_``, ...) anywhere in a spec."""
    if isinstance(value, Mapping):
        found = [k for k in value if isinstance(k, str) and k.startswith("_") and not (top and k == "_target_")]
        return found + [k for item in value.values() for k in _hydra_keys(item, top=False)]
    if isinstance(value, (list, tuple)):
        return [k for item in value for k in _hydra_keys(item, top=False)]
    return []


def resolve_target(spec: Mapping) -> type[nn.Module]:
    """Return the model class a spec names, refusing anything that is not an ``nn.Module`` in fedkd.models.

    Parameters
    ----------
    spec : mapping
        A model spec with a ``_target_`` such as ``"fedkd.models.CNN2d"``.
    """
    target = spec.get("_target_")
    if not isinstance(target, str) or not target.startswith(ALLOWED_PREFIX):
        raise ConfigError(f"model spec {dict(spec)!r}: _target_={target!r} must name a class under {ALLOWED_PREFIX}")
    module_path, _, attr = target.rpartition(".")
    try:  # one import inside fedkd.models and one getattr: no walking through imported modules
        cls = getattr(importlib.import_module(module_path), attr, None)
    except (ImportError, ValueError):
        cls = None
    if not isinstance(cls, type):
        raise ConfigError(f"model spec {dict(spec)!r}: _target_={target!r} is not a class in fedkd.models")
    if not (issubclass(cls, nn.Module) and cls.__module__.startswith(ALLOWED_PREFIX)):
        raise ConfigError(f"model spec {dict(spec)!r}: _target_={target!r} is not a model class of fedkd.models")
    return cls


def build_model(spec: Mapping, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Instantiate the model a spec describes.

    Parameters
    ----------
    spec : mapping
        ``{"_target_": "fedkd.models.<Family>", **hyperparams}``, optionally with a ``name`` key (dropped).
    input_shape : sequence of int
        Shape of one example, without the batch dimension.
    num_classes : int
        Number of output logits.

    Raises
    ------
    ConfigError
        The target is not a fedkd model class, the spec holds Hydra control keys, or the constructor fails.
    """
    plain = plain_mapping(spec, "model spec")
    if forbidden := _hydra_keys(plain):
        raise ConfigError(f"model spec {plain!r}: keys {forbidden} are not allowed (only a top-level '_target_')")
    resolve_target(plain)
    kwargs = {k: v for k, v in plain.items() if k not in NON_CONSTRUCTOR_KEYS}
    try:
        model = hydra.utils.instantiate(kwargs, input_shape, num_classes, _recursive_=False, _convert_="all")
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else exc
        raise ConfigError(f"model spec {plain!r} could not be built for input {input_shape!r}: {cause}") from exc
    log.debug("built %s for input %s: %d parameters", plain, input_shape, count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers such as BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
