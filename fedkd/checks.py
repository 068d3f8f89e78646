"""Every value of a run config, checked before any data is prepared or any engine starts.

`check_run(cfg)` is the run's dry check step (`fedkd.server.prepare_run` calls it first): it
checks the top-level values and the wire's timeouts, builds the clients' training settings
(`TrainSettings`, the optimizer tried by torch), and builds every object the server builds from
the config, as the run will build it: each option of the strategy that is an object of its own
(the aggregator, the transfer source), then the strategy, and finally calls the aggregator once
on made-up logits, so that an option the run would first use after round 1 is tried now.

Constructors check their own options and name them alone (``fraction``); the refusal is named
here by the key a user writes (``aggregator.fraction=0.7: must be a number in [0, 0.5)``): an
option set by interpolation (``aggregator: ${aggregator}``) is named where its value comes from.
An option that is no parameter of the class or function named by ``_target_`` is refused with
the list of its parameters.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import hydra.utils
import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedkd.aggregation import TeacherMeta
from fedkd.devices import select_device
from fedkd.dpsgd import DPSettings, check_dpsgd
from fedkd.errors import ConfigError, find_config_error, require_bool, require_int, require_number
from fedkd.faults import FaultPlan, plan_faults
from fedkd.settings import MAX_SEED, TrainSettings

MAX_PARTITION_SEED = 2**32 - 1
"""Largest data seed (scikit-learn's and NumPy's legacy ``random_state`` limit)."""

_INTERPOLATION = re.compile(r"\$\{([\w.]+)\}")


def check_run(cfg: DictConfig) -> TrainSettings:
    """Check every value of `cfg` that the server or the clients use; return the training part.

    Raises
    ------
    ConfigError
        ``<key>=<value>: <what is allowed>`` for the first value refused.
    """
    require_int("num_clients", cfg.num_clients, 1)
    require_int("num_rounds", cfg.num_rounds, 1)
    require_int("seed", cfg.seed, 0, MAX_SEED)
    require_int("partition_seed", cfg.partition_seed, 0, MAX_PARTITION_SEED)
    require_bool("audit", cfg.get("audit", False))
    select_device()  # FEDKD_DEVICE: a bad value (or cuda without one) stops the run here
    check_wire(cfg.simulation)
    train = train_settings(cfg)
    strategy = check_strategy(cfg)
    if callable(getattr(strategy, "check_train", None)):  # what it needs of its clients
        strategy.check_train(train)
    check_faults(cfg)
    check_privacy(cfg, train)
    codec_spec(cfg)
    return train


def codec_spec(cfg: DictConfig) -> dict | None:
    """The ``codec`` group's spec, checked (`fedkd.codecs.check_codec`); None without one."""
    spec = cfg.get("codec")
    if spec is None:
        return None
    from fedkd.codecs import check_codec

    return check_codec(OmegaConf.to_container(spec, resolve=True))


def check_privacy(cfg: DictConfig, train: TrainSettings) -> DPSettings | None:
    """The ``privacy`` group's DP-SGD settings (`fedkd.dpsgd`), and what they must not be combined
    with (a strategy DP-SGD does not cover, shared class counts, BatchNorm when refused).
    Returns None unless ``privacy=dpsgd``."""
    spec = cfg.get("privacy")
    dp = DPSettings.from_config(OmegaConf.to_container(spec, resolve=True) if spec else None)
    if dp is not None:
        archs = OmegaConf.to_container(cfg.model.get("archs") or {}, resolve=True)
        check_dpsgd(dp, str(cfg.strategy.name), train.share_class_counts, archs)
        for key, off in (("losses", None), ("relation_rows", 0), ("prototype_dim", 0)):
            if getattr(train, key) != off:  # DP-SGD's steps know KD and CE, and share logits
                raise ConfigError(f"distill.{key}", getattr(train, key),
                                  f"must be {'null' if off is None else off} with privacy=dpsgd")
    return dp


def check_faults(cfg: DictConfig) -> FaultPlan | None:
    """The ``faults`` group's plan (`fedkd.faults.plan_faults`), with the run's clients and rounds
    (None: no faults)."""
    spec = cfg.get("faults")
    if spec is None:
        return None
    return plan_faults(OmegaConf.to_container(spec, resolve=True), int(cfg.num_clients),
                       int(cfg.num_rounds), float(cfg.simulation.round_timeout), int(cfg.seed))


def check_wire(simulation: DictConfig) -> None:
    """The round timeout and poll interval every wave on the wire uses (`fedkd.wire.WireGrid`),
    the rounds between checkpoints (`fedkd.strategies.checkpointed`) and the messages a
    ClientApp actor holds at once (`fedkd.simulations.launch.pipeline_depth`)."""
    timeout = require_number("simulation.round_timeout", simulation.round_timeout, 0.0,
                             low_open=True)
    require_number("simulation.poll_interval", simulation.poll_interval, 0.0, timeout,
                   low_open=True)
    require_bool("simulation.verbose", simulation.verbose)
    require_int("simulation.checkpoint_every", simulation.get("checkpoint_every", 0), 0)
    require_int("simulation.pipeline", simulation.get("pipeline", 1), 1)


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The clients' `TrainSettings`: ``distill`` with the strategy's ``client`` delta on top
    (a value refused is named where it was set: ``strategy.client.alpha``)."""
    client = cfg.strategy.get("client") or OmegaConf.create()
    train_cfg = {
        **OmegaConf.to_container(cfg.distill, resolve=True),
        **OmegaConf.to_container(client, resolve=True),
    }
    for key, value in train_cfg.items():
        if key not in TrainSettings.__dataclass_fields__:
            where = "strategy.client" if key in client else "distill"
            raise ConfigError(f"{where}.{key}", value, "is not an option of distill; options: "
                                                       f"{sorted(TrainSettings.__dataclass_fields__)}")
    try:
        return TrainSettings(**train_cfg)
    except ConfigError as err:
        head = err.key.removeprefix("distill.").split(".")[0]
        if not err.has_value or head not in client:
            raise
        raise ConfigError(f"strategy.client.{err.key.removeprefix('distill.')}", err.value,
                          err.allowed) from None


def check_strategy(cfg: DictConfig) -> Any:
    """Build the strategy as the run will (its object options first), try its aggregator once.

    Returns the strategy built (None for a run without one, such as ``strategy=centralized``).
    """
    build(cfg.strategy.runner, "strategy.runner")
    flower = cfg.strategy.get("flower")
    if flower is None:
        return None
    path = "strategy.flower"
    for key in flower:
        value = flower[key]  # an interpolation (aggregator: ${aggregator}) resolved
        if isinstance(value, DictConfig) and "_target_" in value:
            build(value, key_path(flower, path, str(key)))
    strategy = build(flower, path)
    probe_aggregator(strategy, key_path(flower, path, "aggregator"))
    return strategy


def key_path(node: DictConfig, path: str, key: str) -> str:
    """The key a user writes for `key` of `node` (at `path`): where an interpolated value comes
    from (``strategy.flower.temperature: ${distill.temperature}`` -> ``distill.temperature``)."""
    head, _, rest = key.partition(".")
    if head in node and OmegaConf.is_interpolation(node, head):
        source = _INTERPOLATION.fullmatch(str(_raw(node, head)))
        if source is not None:
            return source.group(1) + (f".{rest}" if rest else "")
    return f"{path}.{key}" if path else key


def named(err: ConfigError, node: DictConfig, path: str) -> ConfigError:
    """`err`, raised by the object built from `node`, named by the key a user writes."""
    if not err.has_value:
        return err.within(path)
    return ConfigError(key_path(node, path, err.key), err.value, err.allowed)


def options_of(target: Callable[..., Any], partial: bool = False) -> set[str] | None:
    """The keyword options `target` takes (a class: its ``__init__`` and those it passes
    ``**kwargs`` on to, along the MRO); None when it takes any name. For a `partial` node
    (``_partial_: true``), the parameters without a default are the caller's, not options."""
    functions = ([vars(c)["__init__"] for c in inspect.getmro(target) if "__init__" in vars(c)]
                 if inspect.isclass(target) else [target])
    names: set[str] = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature
            return None
        names |= {p.name for p in parameters
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
                  and not (partial and p.default is p.empty)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


def build(node: DictConfig, path: str) -> Any:
    """Instantiate a ``_target_`` node as Hydra would; a refusal is a `ConfigError` named by key.

    Options that are no parameter of the target are refused before it is called.
    """
    name = node.get("_target_")
    try:
        target = hydra.utils.get_object(str(name))
    except Exception as err:  # noqa: BLE001 - any import failure is a bad _target_
        raise ConfigError(f"{path}._target_", name, f"cannot be imported ({_reason(err)})"
                          ) from None
    options = options_of(target, partial=bool(node.get("_partial_", False)))
    if options is not None:
        for key in node:
            if not str(key).startswith("_") and key not in options:
                raise ConfigError(key_path(node, path, str(key)), _raw(node, key),
                                  f"is not an option of {name}; options: {sorted(options)}")
    try:
        return hydra.utils.instantiate(node)
    except Exception as err:  # noqa: BLE001 - named below, or one line naming the node
        found = find_config_error(err)
        if isinstance(found, ConfigError):
            raise named(found, node, path) from None
        raise ConfigError(f"{path} ({name}) refuses its options: {_reason(err)}") from None


def probe_aggregator(strategy: Any, path: str) -> None:
    """Call the strategy's aggregation once on made-up logits (3 teachers, 2 rows, 3 classes), as
    round 1 will: options an aggregator checks only when called are tried here."""
    if getattr(strategy, "aggregator", None) is None or not hasattr(strategy, "aggregate_logits"):
        return
    k, n, c = 3, 2, 3
    logits = np.random.default_rng(0).normal(size=(k, n, c))
    meta = TeacherMeta(num_examples=np.full(k, 10.0), partition_ids=np.arange(k),
                       class_counts=np.ones((k, c)), server_round=1,
                       seed=int(getattr(strategy, "seed", 0)))
    try:
        strategy.aggregate_logits(logits, meta)
    except ConfigError as err:
        raise err.within(path) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path} refuses its options: {_reason(err)}") from None


def _raw(node: DictConfig, key: Any) -> Any:
    """The value of `key` as written (``${seed}`` for an interpolation), as plain data."""
    return OmegaConf.to_container(node, resolve=False)[key]


def _reason(err: BaseException) -> str:
    """The first line of the innermost cause of `err` (Hydra wraps what the target raised)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
