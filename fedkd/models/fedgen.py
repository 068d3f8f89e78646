"""The FedGen paper's MNIST network (Zhu et al. 2021, github.com/zhuangdizhu/FedGen).

Two stride-2 convolutions with BatchNorm and ReLU, then two Linear layers: 26,434 parameters on
28x28 MNIST. It is the model of the FedGen Table 1 setting (``+experiment=fedgen_mnist``).
Taps (`fedkd.models.taps`): ``block<i>`` (map: conv block i's output) and ``embedding`` (the hidden
Linear's output, which the last Linear reads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedkd.models._common import as_shape, channels_first, check_num_classes, positive_ints
from fedkd.models.taps import EMBEDDING, Tapped, Taps, conv_block_ends, run_stack, stack_taps


def _strided(size: int) -> int:
    """Side after a 3x3 convolution with stride 2 and padding 1."""
    return (size - 1) // 2 + 1


class FedGenCNN(Tapped):
    """Conv(3x3, stride 2) + BN + ReLU per channel width, flatten, Linear -> Linear.

    As in FedGen's ``Net``, the two Linear layers have no activation between them (a linear
    bottleneck of width `hidden`).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``, or ``(H, W)`` for single-channel images (a channel axis is added).
    num_classes : int
        Number of output logits.
    channels : sequence of int
        Output channels of each stride-2 conv block; FedGen uses ``(6, 16)``.
    hidden : int
        Width of the hidden Linear layer; FedGen uses 32.
    """

    has_batchnorm = True
    """Always BatchNorm (`fedkd.dpsgd.spec_has_batchnorm` reads it: ``privacy.batchnorm=refuse``)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (6, 16),
        hidden: int = 32,
    ) -> None:
        super().__init__()
        shape = as_shape(input_shape, "FedGenCNN", (2, 3), "(C, H, W) or (H, W)")
        classes = check_num_classes(num_classes, "FedGenCNN")
        widths = positive_ints(channels, "FedGenCNN", "channels")
        (width,) = positive_ints([hidden], "FedGenCNN", "hidden")
        self.add_channel, in_channels, spatial = channels_first(shape, 2)
        layers: list[nn.Module] = []
        for out in widths:
            layers += [nn.Conv2d(in_channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out),
                       nn.ReLU()]
            in_channels, spatial = out, tuple(_strided(s) for s in spatial)
        flat = in_channels * math.prod(spatial)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(flat, width), nn.Linear(width, classes))
        self._block_ends = conv_block_ends(self.features)
        self.declare_taps(stack_taps(self._block_ends))

    def _run(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        hidden, last = self.head
        features = run_stack(self.features, self._block_ends, x, taps)
        return last(taps.put(EMBEDDING, hidden(features)))
