"""Shape and hyperparameter checks shared by the model families."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedkd.errors import ConfigError


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def as_shape(input_shape: Sequence[int], family: str, ranks: tuple[int, ...], needs: str) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints, checking its rank.

    Parameters
    ----------
    input_shape : sequence of int
        Shape of one example, without the batch dimension.
    family : str
        Model family name, used in the error message.
    ranks : tuple of int
        Allowed ranks; an empty tuple allows any rank >= 1.
    needs : str
        Human description of the allowed shapes, e.g. ``"(C, H, W) or (H, W)"``.
    """
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Iterable):
        raise ConfigError(f"{family}: input_shape {input_shape!r} is not a shape; it needs {needs}")
    shape = tuple(input_shape)
    ok_rank = bool(shape) and (not ranks or len(shape) in ranks)
    if not ok_rank or not all(_is_int(d) and d >= 1 for d in shape):
        raise ConfigError(f"{family}: input_shape {shape} is not allowed; it needs {needs} with positive int sizes")
    return tuple(int(d) for d in shape)


def positive_ints(values: Sequence[int], family: str, name: str, allow_empty: bool = False) -> tuple[int, ...]:
    """Return ``values`` as a tuple of positive ints or raise ConfigError naming ``family: name``."""
    allowed = f"a {'' if allow_empty else 'non-empty '}list of positive ints"
    is_list = isinstance(values, Sequence) and not isinstance(values, (str, bytes))
    if not is_list or (not values and not allow_empty) or not all(_is_int(v) and v >= 1 for v in values):
        raise ConfigError(f"{family}: {name}={values!r} must be {allowed}")
    return tuple(int(v) for v in values)


def positive_int(value: object, family: str, name: str) -> int:
    """Return ``value`` as an int >= 1 or raise ConfigError naming ``family: name``."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{family}: {name}={value!r} must be a positive int")
    return int(value)


def check_num_classes(num_classes: int, family: str) -> int:
    """Return ``num_classes`` as an int >= 1 or raise ConfigError."""
    if not _is_int(num_classes) or num_classes < 1:
        raise ConfigError(f"{family}: num_classes={num_classes!r} must be a positive int")
    return int(num_classes)


def pool_here(size: int, head_pool: int) -> bool:
    """Whether a stride-2 max pool fits: the pooled size stays >= ``head_pool``."""
    return size // 2 >= head_pool


MIN_SIDE = 2
"""A ResNet stage or MobileNet block halves the side (stride 2) only while the result stays >= this."""


def halved(size: int) -> int:
    """Side after a 3x3 convolution with stride 2 and padding 1."""
    return (size - 1) // 2 + 1


def stride_plan(side: int, count: int) -> list[int]:
    """Strides of `count` stages or blocks on a `side`: the first keeps it, each later one halves
    it (stride 2) while the result stays >= `MIN_SIDE`."""
    strides = []
    for index in range(count):
        stride = 2 if index and pool_here(side, MIN_SIDE) else 1
        side = halved(side) if stride == 2 else side
        strides.append(stride)
    return strides


def channels_first(shape: tuple[int, ...], spatial_rank: int) -> tuple[bool, int, tuple[int, ...]]:
    """``(add_channel, in_channels, spatial)`` of an input shape checked by `as_shape`: a shape of
    `spatial_rank` axes has no channel axis, and gets one of size 1 in ``forward``."""
    add = len(shape) == spatial_rank
    return add, 1 if add else shape[0], shape if add else shape[1:]


def check_flag(value: object, family: str, name: str) -> bool:
    """`value` as a bool, or a ConfigError naming ``family: name``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{family}: {name}={value!r} must be true or false")
    return value


def plain_mapping(value: Any, what: str) -> dict:
    """A plain-dict copy of a mapping or DictConfig (interpolations resolved); ConfigError naming ``what``."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what}={value!r} must be a mapping")
    return dict(value)
