"""MobileNet-v1 style network (Howard et al. 2017) for small images.

A 3x3 stem conv, then one depthwise-separable block per width: a depthwise 3x3 conv (one filter
per channel) + BN + ReLU and a pointwise 1x1 conv + BN + ReLU. Every block after the first halves
the side (stride 2 in its depthwise conv) while the halved side stays >= 2 (8x8 digits with three
blocks: 8 -> 8 -> 4 -> 2; 28x28 MNIST: 28 -> 28 -> 14 -> 7); global average pool, one Linear.
Convolutions have no bias (BatchNorm follows each).

Taps (`fedkd.models.taps`): ``block<i>`` (map: block i's output) and ``embedding`` (the pooled
features the head reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.models._common import (
    as_shape, channels_first, check_num_classes, positive_int, positive_ints, stride_plan,
)
from fedkd.models.taps import EMBEDDING, Tapped, Taps


def separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (stride `stride`) + BN + ReLU, pointwise 1x1 + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels), nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
    )


class MobileNet(Tapped):
    """Depthwise-separable blocks with BatchNorm (module docstring).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``, or ``(H, W)`` for single-channel images (a channel axis is added).
    num_classes : int
        Number of output logits.
    widths : sequence of int
        Output channels of each depthwise-separable block.
    stem : int
        Output channels of the 3x3 stem conv.
    """

    has_batchnorm = True
    """Always BatchNorm (`fedkd.dpsgd.spec_has_batchnorm` reads it: ``privacy.batchnorm=refuse``)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (32, 64, 128),
        stem: int = 16,
    ) -> None:
        super().__init__()
        shape = as_shape(input_shape, "MobileNet", (2, 3), "(C, H, W) or (H, W)")
        classes = check_num_classes(num_classes, "MobileNet")
        blocks = positive_ints(widths, "MobileNet", "widths")
        channels = positive_int(stem, "MobileNet", "stem")
        self.add_channel, in_channels, spatial = channels_first(shape, 2)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList()
        for width, stride in zip(blocks, stride_plan(min(spatial), len(blocks))):
            self.blocks.append(separable(channels, width, stride))
            channels = width
        self.head = nn.Linear(channels, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.declare_taps({**{f"block{i}": "map" for i in range(1, len(blocks) + 1)},
                           EMBEDDING: EMBEDDING})

    def _run(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        x = self.stem(x)
        for index, block in enumerate(self.blocks, start=1):
            x = taps.put(f"block{index}", block(x))
        features = taps.put(EMBEDDING, torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return self.head(features)
