"""The version gate every patch of Flower's internals passes first (`fedkd.flower_compat`)."""

from __future__ import annotations

import functools

SUPPORTED_FLOWER = "1.42"
"""The Flower minor release whose internals fedkd patches (any 1.42.x)."""


class UnsupportedFlowerError(RuntimeError):
    """Flower's internals are requested on a Flower version fedkd does not support."""


def require_supported_flower() -> str:
    """The installed ``flwr.__version__``; raise `UnsupportedFlowerError` unless it is 1.42.x."""
    import flwr

    return _check_version(str(flwr.__version__))


@functools.lru_cache(maxsize=None)
def _check_version(installed: str) -> str:
    if installed.split(".")[:2] != SUPPORTED_FLOWER.split("."):
        raise UnsupportedFlowerError(
            f"fedkd patches Flower internals that it supports on flwr {SUPPORTED_FLOWER}.x only, "
            f"but flwr {installed} is installed: install flwr=={SUPPORTED_FLOWER}.* or run plain "
            "flower-supernode (no fedkd patches, no persistent worker)")
    return installed


def _shape_error(what: str) -> RuntimeError:
    return RuntimeError(f"{what}: fedkd's patches of Flower internals support flwr "
                        f"{SUPPORTED_FLOWER}.x (run plain flower-supernode instead)")
