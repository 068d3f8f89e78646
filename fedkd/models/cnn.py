"""Small convolutional families: CNN2d for images, CNN1d for signals.

Both stack blocks ``conv -> [BatchNorm] -> ReLU -> [MaxPool(2)]``, pooling only while the pooled size stays
>= ``head_pool``, then average-pool adaptively to ``head_pool`` (per spatial axis), flatten and apply one Linear.
Taps (`fedkd.models.taps`): ``block<i>`` (map: block i's output, after its pool) and ``embedding``
(the flattened features the head reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedkd.errors import ConfigError
from fedkd.models._common import (
    as_shape, channels_first, check_num_classes, pool_here, positive_ints,
)
from fedkd.models.taps import EMBEDDING, Tapped, Taps, conv_block_ends, run_stack, stack_taps

_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
}


def conv_features(
    dims: int,
    in_channels: int,
    spatial: tuple[int, ...],
    channels: Sequence[int],
    kernel_size: int,
    batchnorm: bool,
    head_pool: int,
) -> nn.Sequential:
    """Conv blocks, adaptive average pool and flatten; output ``[N, channels[-1] * head_pool**dims]``.

    Parameters
    ----------
    dims : int
        1 or 2 spatial dimensions.
    in_channels : int
        Channels of the input.
    spatial : tuple of int
        Spatial size of the input (``(L,)`` or ``(H, W)``), used to decide where to pool.
    channels : sequence of int
        Output channels of each block.
    kernel_size : int
        Convolution kernel size; padding keeps the spatial size ("same").
    batchnorm : bool
        Insert BatchNorm after each convolution.
    head_pool : int
        Spatial side of the adaptive average pool before flattening (1 = global average pooling).
    """
    conv, norm, pool, adaptive = _LAYERS[dims]
    layers: list[nn.Module] = []
    size = min(spatial)
    for width in channels:
        layers.append(conv(in_channels, width, kernel_size, padding="same"))
        if batchnorm:
            layers.append(norm(width))
        layers.append(nn.ReLU())
        if pool_here(size, head_pool):
            layers.append(pool(2))
            size //= 2
        in_channels = width
    layers += [adaptive(head_pool), nn.Flatten()]
    return nn.Sequential(*layers)


def _check_common(
    family: str, num_classes: int, channels: Sequence[int], batchnorm: bool, head_pool: int
) -> tuple[int, tuple[int, ...], int]:
    """Validate the hyperparameters both CNN families share; return (classes, channels, head_pool)."""
    classes = check_num_classes(num_classes, family)
    widths = positive_ints(channels, family, "channels")
    if not isinstance(batchnorm, bool):
        raise ConfigError(f"{family}: batchnorm={batchnorm!r} must be true or false")
    (pool_side,) = positive_ints([head_pool], family, "head_pool")
    return classes, widths, pool_side


class _ConvStack(Tapped):
    """What both CNN families share: a feature stack (`conv_features`) read by one Linear head."""

    features: nn.Sequential
    head: nn.Linear
    add_channel: bool

    def _declare_stack_taps(self) -> None:
        self._block_ends = conv_block_ends(self.features)
        self.declare_taps(stack_taps(self._block_ends))

    def _run(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        features = run_stack(self.features, self._block_ends, x, taps)
        return self.head(taps.put(EMBEDDING, features))


class CNN2d(_ConvStack):
    """2-D CNN: 3x3 conv blocks with max pooling, adaptive average pool, one Linear head.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``, or ``(H, W)`` for single-channel images (a channel axis is added in ``forward``).
    num_classes : int
        Number of output logits.
    channels : sequence of int
        Output channels of each conv block.
    batchnorm : bool
        BatchNorm2d after each convolution.
    head_pool : int
        Side of the adaptive average pool before the head: 1 (default) is global average pooling; 2 keeps a
        2x2 map (the reference networks in REFERENCE.md, 1.9k / 7.3k parameters on digits).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (8, 16),
        batchnorm: bool = True,
        head_pool: int = 1,
    ) -> None:
        super().__init__()
        shape = as_shape(input_shape, "CNN2d", (2, 3), "(C, H, W) or (H, W)")
        classes, widths, pool_side = _check_common("CNN2d", num_classes, channels, batchnorm, head_pool)
        self.add_channel, in_channels, spatial = channels_first(shape, 2)
        self.features = conv_features(2, in_channels, spatial, widths, 3, batchnorm, pool_side)
        self.head = nn.Linear(widths[-1] * pool_side**2, classes)
        self._declare_stack_taps()


class CNN1d(_ConvStack):
    """1-D CNN: conv blocks with max pooling, adaptive average pool, one Linear head.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, L)``, or ``(L,)`` for single-channel signals (a channel axis is added in ``forward``).
    num_classes : int
        Number of output logits.
    channels : sequence of int
        Output channels of each conv block.
    kernel_size : int
        Convolution kernel size ("same" padding).
    batchnorm : bool
        BatchNorm1d after each convolution.
    head_pool : int
        Length of the adaptive average pool before the head (1 = global average pooling).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 5,
        batchnorm: bool = True,
        head_pool: int = 1,
    ) -> None:
        super().__init__()
        shape = as_shape(input_shape, "CNN1d", (1, 2), "(C, L) or (L,)")
        classes, widths, pool_side = _check_common("CNN1d", num_classes, channels, batchnorm, head_pool)
        (kernel,) = positive_ints([kernel_size], "CNN1d", "kernel_size")
        self.add_channel, in_channels, spatial = channels_first(shape, 1)
        self.features = conv_features(1, in_channels, spatial, widths, kernel, batchnorm, pool_side)
        self.head = nn.Linear(widths[-1] * pool_side, classes)
        self._declare_stack_taps()
