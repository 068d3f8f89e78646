"""Taps: named intermediate tensors every model family declares and its own forward code produces.

A tap is what a feature, relation or prototype loss reads from a model besides its logits. Every
family (`Tapped`) declares its taps (``tap_kinds``: name -> kind) and writes one private
``_run(x, taps)`` that computes the logits and hands each intermediate tensor to ``taps``; only
the requested ones are kept. ``forward`` runs it requesting none (the logits, the same arithmetic
as a plain forward), ``forward_taps`` requesting some. No forward hooks.

Kinds (`TAP_KINDS`) and the shape each promises, for a batch of N:

- ``embedding``: ``[N, D]``, the vector the final Linear head reads (every family has one,
  named ``embedding``);
- ``map``: conv activations ``[N, C, H, W]`` or ``[N, C, L]`` (``block1``, ``block2``, ...);
- ``tokens``: transformer block outputs ``[N, T, D]``;
- ``attention``: attention weights ``[N, heads, T, T]``, softmaxed (rows sum to 1);
- ``logits``: an auxiliary exit head's ``[N, num_classes]`` (deep-to-shallow self-distillation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fedkd.errors import ConfigError

TAP_KINDS = ("embedding", "map", "tokens", "attention", "logits")
"""What a tap can hold (module docstring: the shape of each)."""

EMBEDDING = "embedding"
"""The tap every family has: the input of its final Linear head."""

_CONVS = (nn.Conv1d, nn.Conv2d)
_TAILS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten)


class Taps:
    """Collects the requested taps during one forward pass; the others are dropped as they come.

    Parameters
    ----------
    wanted : iterable of str
        The tap names to keep.
    """

    def __init__(self, wanted: Iterable[str] = ()) -> None:
        self.wanted = frozenset(wanted)
        self.kept: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        """Whether `name` was requested (compute a tap that costs extra only then)."""
        return name in self.wanted

    def put(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Keep `value` under `name` if it was requested; return `value` unchanged."""
        if name in self.wanted:
            self.kept[name] = value
        return value


def check_tap(model: nn.Module, name: object) -> str:
    """The kind of `model`'s tap `name`.

    Raises
    ------
    ConfigError
        `model` has no tap `name`; the message names the model class and lists its taps.
    """
    kinds = getattr(model, "tap_kinds", None)
    kinds = kinds if isinstance(kinds, Mapping) else {}
    if not isinstance(name, str) or name not in kinds:
        raise ConfigError("tap", name, f"{type(model).__name__} has no such tap; allowed: "
                                       f"{list(kinds)}")
    return kinds[name]


class Tapped(nn.Module):
    """Base of the model families: ``forward`` and ``forward_taps`` both call ``_run``.

    A family calls `declare_taps` in its constructor and implements ``_run(x, taps)``, which
    returns the logits and passes every declared tap through ``taps.put(name, tensor)``.
    """

    def declare_taps(self, kinds: Mapping[str, str]) -> None:
        """Set the family's taps (name -> kind); every kind in `TAP_KINDS`, ``embedding`` present."""
        bad = {name: kind for name, kind in kinds.items() if kind not in TAP_KINDS}
        if bad or kinds.get(EMBEDDING) != EMBEDDING:
            raise ValueError(f"{type(self).__name__}: taps {dict(kinds)} need kinds in {TAP_KINDS} "
                             f"and an '{EMBEDDING}' tap")
        self._tap_kinds = dict(kinds)

    @property
    def tap_kinds(self) -> dict[str, str]:
        """Tap name -> kind (one of `TAP_KINDS`), in the order the forward pass produces them."""
        return dict(self._tap_kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for a batch ``[N, *input_shape]``."""
        return self._run(x, Taps())

    def forward_taps(self, x: torch.Tensor, names: Iterable[str] | str
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The logits (equal to ``forward(x)``) and exactly the taps `names` (one name: a string).

        Raises
        ------
        ConfigError
            A name that is no tap of this model (`check_tap`).
        """
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            check_tap(self, name)
        taps = Taps(names)
        logits = self._run(x, taps)
        return logits, {name: taps.kept[name] for name in names}

    def _run(self, x: torch.Tensor, taps: Taps) -> torch.Tensor:
        raise NotImplementedError


def conv_block_ends(layers: nn.Sequential) -> tuple[int, ...]:
    """Index of the last layer of each conv block of a feature stack.

    A block ends before the next convolution, or before the first layer that belongs to no block
    (an adaptive pool or a flatten: the stack's tail).
    """
    ends: list[int] = []
    for index, layer in enumerate(layers):
        if isinstance(layer, _TAILS):
            ends.append(index - 1)
            break
        if index and isinstance(layer, _CONVS):
            ends.append(index - 1)
    return tuple(ends)


def run_stack(layers: nn.Sequential, ends: tuple[int, ...], x: torch.Tensor, taps: Taps
              ) -> torch.Tensor:
    """``layers(x)``, layer by layer (the same arithmetic), offering block ``i``'s output as the
    tap ``block<i>`` (`conv_block_ends`)."""
    block = 0
    for index, layer in enumerate(layers):
        x = layer(x)
        if index in ends:
            block += 1
            taps.put(f"block{block}", x)
    return x


def stack_taps(ends: tuple[int, ...]) -> dict[str, str]:
    """The map taps of a conv stack (`conv_block_ends`) and the embedding."""
    return {**{f"block{i}": "map" for i in range(1, len(ends) + 1)}, EMBEDDING: EMBEDDING}
