"""CIFAR-style ResNet (He et al. 2016, "Deep Residual Learning", section 4.2).

A 3x3 stem conv, then one stage of ``n`` BasicBlocks per width (``(16, 32, 64)``: three stages,
depth ``6n + 2``: ResNet-8, -14, -20, -32, ...), global average pool, one Linear. Every stage after
the first halves the side (stride 2) while the halved side stays >= 2: 8x8 digits go 8 -> 4 -> 2,
28x28 MNIST 28 -> 14 -> 7, 32x32 CIFAR 32 -> 16 -> 8.

Shortcuts are the paper's CIFAR choice, option A (identity; a block that halves the side or widens
the channels subsamples and zero-pads, no parameters): ResNet-20 on 3x32x32 with 10 classes has
269,722 parameters, ResNet-8 75,290. ``projection: true`` is option B (1x1 conv + BatchNorm where
the shape changes): 272,474 and 78,042.

Taps (`fedkd.models.taps`): ``block<s>`` (map: stage s's output), ``embedding`` (the pooled
features the head reads) and, with ``exits: true``, ``exit<s>`` (logits: a small auxiliary head,
global pool + Linear, after every stage but the last) for deep-to-shallow self-distillation.
The exits never change ``forward``'s logits and run only when their tap is requested.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.errors import ConfigError
from fedkd.models._common import (
    as_shape, channels_first, check_flag, check_num_classes, positive_ints, stride_plan,
)
from fedkd.models.taps import EMBEDDING, Tapped, Taps


class ShortcutA(nn.Module):
    """Option A: subsample by `stride` and zero-pad `extra` channels (no parameters)."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input, subsampled and padded to the block's output shape."""
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, -> ReLU.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out.
    stride : int
        Stride of the first convolution (1 or 2).
    projection : bool
        A 1x1 conv + BN shortcut where the shape changes (option B) instead of option A.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, projection: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                           nn.BatchNorm2d(out_channels)) if projection
                             else ShortcutA(stride, out_channels - in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output ``[N, out_channels, H', W']``."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def exit_head(channels: int, num_classes: int) -> nn.Sequential:
    """An auxiliary exit: global average pool, flatten, Linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def blocks_per_stage(depth: object, stages: int) -> int:
    """``n`` of a depth ``2 + 2 * n * stages`` (6n + 2 for three stages), or a ConfigError."""
    n, rest = divmod(depth - 2, 2 * stages) if isinstance(depth, int) and not isinstance(depth, bool) \
        else (0, 1)
    if rest or n < 1:
        examples = ", ".join(str(2 + 2 * k * stages) for k in range(1, 5))
        raise ConfigError(f"ResNet: depth={depth!r} must be 2 + 2*n*{stages} (n >= 1 blocks per stage "
                          f"for {stages} widths): {examples}, ...")
    return n


class ResNet(Tapped):
    """CIFAR-style ResNet with BasicBlocks and BatchNorm (module docstring).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``, or ``(H, W)`` for single-channel images (a channel axis is added).
    num_classes : int
        Number of output logits.
    depth : int
        Layers with weights, ``2 + 2 * n * len(widths)``: 8 (ResNet-8), 20 (ResNet-20), ...
    widths : sequence of int
        Channels of each stage; the stem has ``widths[0]``.
    exits : bool
        Auxiliary exit heads after every stage but the last (taps ``exit1``, ``exit2``, ...).
    projection : bool
        Option-B shortcuts (1x1 conv + BN) where the shape changes, instead of option A.
    """

    has_batchnorm = True
    """Always BatchNorm (`fedkd.dpsgd.spec_has_batchnorm` reads it: ``privacy.batchnorm=refuse``)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 20,
        widths: Sequence[int] = (16, 32, 64),
        exits: bool = False,
        projection: bool = False,
    ) -> None:
        super().__init__()
        shape = as_shape(input_shape, "ResNet", (2, 3), "(C, H, W) or (H, W)")
        classes = check_num_classes(num_classes, "ResNet")
        stages = positive_ints(widths, "ResNet", "widths")
        n = blocks_per_stage(depth, len(stages))
        with_exits = check_flag(exits, "ResNet", "exits")
        option_b = check_flag(projection, "ResNet", "projection")
        if not option_b and any(b < a for a, b in zip(stages, stages[1:])):
            raise ConfigError(f"ResNet: widths={list(stages)} must not decrease with option-A shortcuts "
                              "(zero-padded channels); set projection: true")
        self.add_channel, in_channels, spatial = channels_first(shape, 2)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stages[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stages[0]), nn.ReLU())
        self.stages = nn.ModuleList()
        channels = stages[0]
        for width, stride in zip(stages, stride_plan(min(spatial), len(stages))):
            blocks = [BasicBlock(channels if b == 0 else width, width, stride if b == 0 else 1, option_b)
                      for b in range(n)]
            self.stages.append(nn.Sequential(*blocks))
            channels = width
        if with_exits:
            self.exit_heads = nn.ModuleList(exit_head(w, classes) for w in stages[:-1])
        self.head = nn.Linear(stages[-1], classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        exit_taps = {f"exit{s}": "logits" for s in range(1, len(stages))} if with_exits else {}
        self.declare_taps({**{f"block{s}": "map" for s in range(1, len(stages) + 1)}, **exit_taps,
                           EMBEDDING: EMBEDDING})

    def _run(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        x = self.stem(x)
        for index, stage in enumerate(self.stages, start=1):
            x = taps.put(f"block{index}", stage(x))
            if taps.wants(f"exit{index}"):
                taps.put(f"exit{index}", self.exit_heads[index - 1](x))
        features = taps.put(EMBEDDING, torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return self.head(features)
