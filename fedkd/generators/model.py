"""The conditional generator: noise and a requested class in, an input shaped like the data out."""

from __future__ import annotations

import math

import torch
from torch import nn


class ConditionalGenerator(nn.Module):
    """``G(z, y)``: an MLP from noise ``z`` and a class embedding to inputs in ``[low, high]``.

    Small on purpose: it runs on the server, between rounds (on a GPU when there is one). Any input
    shape works (the output is reshaped), so the same generator serves 8x8 images and 1-d signals.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one data input, e.g. ``(1, 8, 8)``.
    num_classes : int
        Number of classes that can be requested.
    z_dim : int
        Dimension of the noise.
    hidden : int
        Width of the two hidden layers.
    low, high : float
        Output range (a scaled sigmoid); match it to the normalised data.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, z_dim: int = 32,
                 hidden: int = 256, low: float = 0.0, high: float = 1.0) -> None:
        super().__init__()
        self.input_shape, self.num_classes, self.z_dim = tuple(input_shape), num_classes, z_dim
        self.low, self.high = low, high
        self.embed = nn.Embedding(num_classes, z_dim)
        self.net = nn.Sequential(
            nn.Linear(2 * z_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, math.prod(self.input_shape)),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inputs ``[N, *input_shape]`` for noise ``z`` ``[N, z_dim]`` and classes ``y`` ``[N]``."""
        out = torch.sigmoid(self.net(torch.cat([z, self.embed(y)], dim=1)))
        return (self.low + (self.high - self.low) * out).view(len(z), *self.input_shape)


def balanced_labels(n: int, num_classes: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """``n`` class labels, each class as often as possible (counts differ by at most 1), shuffled
    when a generator is given."""
    y = torch.arange(n) % num_classes
    return y if gen is None else y[torch.randperm(n, generator=gen)]
