"""``model=auto``: architectures that fit the input's rank, and a check that named ones do.

The rule (`input_kind`), on the shape of one example (no batch axis):

- rank 3 ``(C, H, W)``: an ``image``;
- rank 2: an ``image`` ``(H, W)`` when both sides are >= `MIN_IMAGE_SIDE`, else a ``signal``
  ``(C, L)`` (MNIST-1D's ``(1, 40)``);
- rank 1 ``(F,)`` (a feature vector, a table row), or rank >= 4: a ``vector``, for an MLP
  (it flattens any input).

``conf/model/auto.yaml`` holds a catalog ``archs`` and, under ``kinds``, the arch names and the
cycle of each kind; `resolve_model` turns it into a plain model config (``archs``, ``cycle``,
``clients``, ``roles``) for `fedkd.models.assign_models`. Each kind's choice equals a named
preset (`SAME_AS`), so ``model=auto`` on digits is ``model=hetero_cnn`` to the last parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fedkd.errors import ConfigError
from fedkd.models._common import plain_mapping
from fedkd.models.build import build_model, check_spec

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 4
"""A rank-2 input is an image ``(H, W)`` when both sides are at least this, else ``(C, L)``."""

SAME_AS = {"image": "hetero_cnn", "signal": "hetero1d", "vector": "mlp"}
"""Input kind -> the named ``conf/model`` preset that ``model=auto`` chooses for it."""

KINDS = tuple(SAME_AS)


def input_kind(input_shape: Sequence[int]) -> str:
    """``image``, ``signal`` or ``vector``: what the shape of one example holds (module rule)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        return "image"
    if len(shape) == 2:
        return "image" if min(shape) >= MIN_IMAGE_SIDE else "signal"
    return "vector"


def is_auto(model_cfg: Mapping) -> bool:
    """Whether a model config asks for the automatic choice (it has ``kinds``)."""
    return "kinds" in model_cfg


def resolve_model(model_cfg: Mapping, input_shape: Sequence[int], num_classes: int) -> dict:
    """The model config to assign architectures from, checked against the data.

    Parameters
    ----------
    model_cfg : mapping
        The ``model`` node: ``model=auto`` (a catalog ``archs`` and ``kinds``) or a named
        model (``archs``, ``cycle``, ...), returned as it is.
    input_shape : sequence of int
        Shape of one example.
    num_classes : int
        Number of classes.

    Raises
    ------
    ConfigError
        An arch of the (resolved) config cannot be built for this input; the message names
        the model that fits.
    """
    cfg = plain_mapping(model_cfg, "model config")
    kind = input_kind(input_shape)
    auto = is_auto(cfg)
    if auto:
        cfg = _choose(cfg, kind)
        log.info("model=auto: input %s is a%s %s -> archs %s, cycle %s (as model=%s)",
                 tuple(input_shape), "n" if kind == "image" else "", kind, list(cfg["archs"]),
                 cfg["cycle"], SAME_AS[kind])
    _check_buildable(cfg, input_shape, num_classes, kind, auto)
    return cfg


def _choose(cfg: Mapping[str, Any], kind: str) -> dict:
    """Replace the catalog and ``kinds`` by the archs and cycle of `kind`."""
    kinds = plain_mapping(cfg.get("kinds"), "model.kinds")
    if missing := [k for k in KINDS if k not in kinds]:
        raise ConfigError(f"model.kinds has no entry for {missing}; it needs {list(KINDS)}")
    chosen = plain_mapping(kinds[kind], f"model.kinds.{kind}")
    catalog = plain_mapping(cfg.get("archs"), "model.archs")
    cycle, names = chosen.get("cycle"), chosen.get("archs", chosen.get("cycle"))
    if not all(isinstance(v, list) and v for v in (cycle, names)):
        raise ConfigError(f"model.kinds.{kind}={chosen!r} needs a non-empty list 'cycle' "
                          f"(and optionally 'archs') of names from model.archs {sorted(catalog)}")
    if unknown := sorted({n for n in [*names, *cycle] if n not in catalog}):
        raise ConfigError(f"model.kinds.{kind} names {unknown}, not in model.archs "
                          f"{sorted(catalog)}")
    rest = {k: v for k, v in cfg.items() if k not in ("archs", "kinds")}
    return {"archs": {n: catalog[n] for n in names}, "cycle": list(cycle), **rest}


def _check_buildable(cfg: Mapping[str, Any], input_shape: Sequence[int], num_classes: int,
                     kind: str, auto: bool) -> None:
    """Build every arch of `cfg` once; a failure is a one-line ConfigError with a suggestion."""
    archs = cfg.get("archs")
    if not isinstance(archs, Mapping):
        return  # assign_models names the problem
    for name, spec in archs.items():
        check_spec(spec, f"model.archs.{name}")  # a malformed spec is not the input's fault
        try:
            build_model(spec, tuple(input_shape), num_classes)
        except ConfigError as err:
            hint = ("name a model that fits it, e.g. model=mlp (an MLP flattens any input)" if auto
                    else f"use model={SAME_AS[kind]} (or model=auto)")
            reason = " ".join(str(err.__cause__ or err).split())  # the family's own words
            raise ConfigError(f"model arch '{name}' ({spec['_target_']}) cannot be built "
                              f"for the {kind} input {tuple(input_shape)}: {reason}; {hint}"
                              ) from err
