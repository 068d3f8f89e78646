"""Multi-layer perceptron over flattened inputs.

Taps (`fedkd.models.taps`): ``embedding``, what the last Linear reads (the last hidden layer's
output, or the flattened input when there is none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedkd.errors import ConfigError
from fedkd.models._common import as_shape, check_num_classes, positive_ints
from fedkd.models.taps import EMBEDDING, Tapped, Taps


class MLP(Tapped):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden layer -> Linear.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one example, any rank; it is flattened.
    num_classes : int
        Number of output logits.
    hidden : sequence of int
        Width of each hidden layer; empty gives multinomial logistic regression.
    dropout : float
        Dropout probability after each hidden ReLU, in [0, 1).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = as_shape(input_shape, "MLP", (), "a shape of any rank >= 1")
        classes = check_num_classes(num_classes, "MLP")
        widths = positive_ints(hidden, "MLP", "hidden", allow_empty=True)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"MLP: dropout={dropout!r} must be a float in [0, 1)")
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = math.prod(shape)
        for width in widths:
            layers += [nn.Linear(width_in, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(float(dropout)))
            width_in = width
        layers.append(nn.Linear(width_in, classes))
        self.net = nn.Sequential(*layers)
        self.declare_taps({EMBEDDING: EMBEDDING})

    def _run(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        *body, head = self.net
        for layer in body:
            x = layer(x)
        return head(taps.put(EMBEDDING, x))
