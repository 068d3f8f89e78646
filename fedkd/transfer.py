"""Transfer-set sources: what the server asks the teachers' logits on each round.

A source returns either integer row indices into the public set every node holds (`Public`), or
float inputs shaped like the data that the server made itself without any data (`UniformNoise`,
`GaussianNoise`; generators plug in here later). `fedkd.protocol.transfer_record` names them
``*.indices`` or ``*.inputs``; synthetic inputs travel as arrays and the wire counts their bytes.
Every source is seeded from (seed, round), so runs are reproducible.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import numpy as np

from fedkd.settings import ClientSettings
from fedkd.errors import ConfigError, is_number, require_int, require_number


class TransferSource(Protocol):
    """Something that names this round's transfer rows."""

    def rows(self, server_round: int, settings: ClientSettings) -> np.ndarray:
        """Integer indices into the public set, or float inputs [M, *input_shape]."""


def _check_size(size: int | None, allow_none: bool) -> None:
    require_int("size", size, 1, null=allow_none)


class Public:
    """Rows of the shared public set: all of them, or a fresh seeded sample of `size` per round."""

    def __init__(self, size: int | None = None, seed: int = 0) -> None:
        _check_size(size, allow_none=True)
        require_int("seed", seed, 0)
        self.size, self.seed = size, seed

    def rows(self, server_round: int, settings: ClientSettings) -> np.ndarray:
        """Sorted indices into the public set."""
        num_public = int(settings.data["num_public"])
        if self.size is None or self.size >= num_public:
            return np.arange(num_public, dtype=np.int64)
        rng = np.random.default_rng([self.seed, server_round])
        return np.sort(rng.choice(num_public, self.size, replace=False)).astype(np.int64)


class _Noise(ABC):
    """`size` synthetic inputs shaped like the data, drawn afresh (seeded) every round."""

    size: int
    seed: int

    def rows(self, server_round: int, settings: ClientSettings) -> np.ndarray:
        """Float32 inputs [size, *input_shape]."""
        rng = np.random.default_rng([self.seed, server_round])
        return self.draw(rng, (self.size, *settings.data["input_shape"])).astype(np.float32)

    @abstractmethod
    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Samples of the given shape."""


class UniformNoise(_Noise):
    """Inputs drawn uniformly from [low, high] (match it to the data's normalised range)."""

    def __init__(self, size: int = 400, low: float = 0.0, high: float = 1.0, seed: int = 0) -> None:
        _check_size(size, allow_none=False)
        require_number("low", low)
        if not (is_number(high) and high > low):
            raise ConfigError("high", high, f"must be a number > low (low={low:g})")
        require_int("seed", seed, 0)
        self.size, self.low, self.high, self.seed = size, low, high, seed

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Uniform samples in [low, high]."""
        return rng.uniform(self.low, self.high, size=shape)


class GaussianNoise(_Noise):
    """Inputs drawn from N(mean, std^2) (match it to the data's normalised statistics)."""

    def __init__(self, size: int = 400, mean: float = 0.0, std: float = 1.0, seed: int = 0) -> None:
        _check_size(size, allow_none=False)
        require_number("mean", mean)
        require_number("std", std, 0.0, low_open=True)
        require_int("seed", seed, 0)
        self.size, self.mean, self.std, self.seed = size, mean, std, seed

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Gaussian samples with the given mean and std."""
        return rng.normal(self.mean, self.std, size=shape)
