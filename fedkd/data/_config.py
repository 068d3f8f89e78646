"""Small helpers for config nodes: plain-dict conversion and error-wrapped instantiation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedkd.errors import ConfigError


def to_plain(cfg: Any) -> Any:
    """Return ``cfg`` as plain Python containers (resolving OmegaConf interpolations)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


def require_target(cfg: Any, key: str) -> dict[str, Any]:
    """Check that ``cfg`` is a mapping with a ``_target_`` and return a plain copy."""
    node = to_plain(cfg)
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(
            f"{key} must be a config node with a '_target_' naming a callable, got {node!r}"
        )
    return node


def instantiate(node: Mapping[str, Any], key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose failures become :class:`ConfigError`.

    A ConfigError raised by the target itself is passed on unchanged.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    target = node.get("_target_")
    try:
        return hydra_instantiate(dict(node), **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: could not instantiate '{target}': {cause}") from err
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{key}: could not instantiate '{target}': {err}") from err
