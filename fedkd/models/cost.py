"""What a model costs: parameters, and FLOPs of one forward pass on one example."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedkd.models.build import count_parameters


def model_cost(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Parameters and FLOPs of ``forward`` on one example.

    FLOPs are those torch's ``FlopCounterMode`` counts (matrix products and convolutions, a
    multiply-add being 2; element-wise work, norms and pooling are not counted) on a batch of one
    zero input in eval mode without gradients; every module's train/eval mode is restored after.
    Auxiliary exits and taps that ``forward`` does not compute are not counted. No randomness is
    drawn.

    Parameters
    ----------
    model : nn.Module
        The model; its input goes on the device and in the dtype of its first parameter.
    input_shape : sequence of int
        Shape of one example, without the batch dimension.

    Returns
    -------
    tuple of int
        (parameters, FLOPs per example).
    """
    first = next(model.parameters(), None)
    like = {"device": first.device, "dtype": first.dtype} if first is not None else {}
    x = torch.zeros(1, *(int(d) for d in input_shape), **like)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for module, training in modes:
            module.training = training
    return count_parameters(model), int(counter.get_total_flops())
