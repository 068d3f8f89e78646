"""Client-level differential privacy for the aggregate (DP-FedAvg, McMahan et al. 2018): the server clips each
client's contribution to an L2 norm bound and adds Gaussian noise to the sum.

A client's contribution is one array: its probability matrix ``[N, C]`` on the round's transfer rows, its
logit matrix, or its weight update (new weights minus the round's global weights). Adding or removing one
client moves the clipped sum by at most ``clip`` in L2, so the sum plus ``N(0, (noise_multiplier * clip)^2)``
per entry is a Gaussian mechanism of noise multiplier ``noise_multiplier``. Each round samples clients with
probability ``sampling_rate`` (the strategy's ``fraction_train``); the rounds compose. The ledger is
dp-accounting's RDP accountant with one ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per round.

Assumptions (docs/privacy.md): the server is trusted to clip and add noise (central DP); the sample is
treated as Poisson sampling at rate ``fraction_train`` (fedkd's sample is a seeded fixed-size sample of
partitions: an approximation the accounting states); a client is one partition.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from fedkd.errors import require_number

DP_NOISE_STREAM = 0xD1FF
"""The noise stream (with the seed and round) of client-level DP noise, apart from any aggregator's noise."""

if TYPE_CHECKING:  # built lazily: dp_accounting pulls in SciPy
    from dp_accounting.rdp import RdpAccountant


def clip_to_norm(contribution: np.ndarray, clip: float) -> np.ndarray:
    """``contribution * min(1, clip / ||contribution||_2)`` (the L2 norm of the whole array), float64."""
    contribution = np.asarray(contribution, dtype=np.float64)
    norm = float(np.linalg.norm(contribution))
    return contribution if norm <= clip else contribution * (clip / norm)


def noisy_clipped_sum(contributions: np.ndarray, clip: float, noise_multiplier: float,
                      rng: np.random.Generator) -> np.ndarray:
    """``sum_k clip_to_norm(c_k) + N(0, (noise_multiplier * clip)^2)`` over the first axis ``[K, ...]``."""
    contributions = np.asarray(contributions, dtype=np.float64)
    total = sum((clip_to_norm(c, clip) for c in contributions), np.zeros(contributions.shape[1:]))
    return total + rng.normal(0.0, noise_multiplier * clip, size=total.shape)


@contextmanager
def quiet_absl() -> Iterator[None]:
    """dp-accounting's warnings (absl) at ERROR level only while the block runs: with sampling,
    every round would log one line per fractional RDP order it leaves out of the bound."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


class ClientDP:
    """The server's clipping, noise and privacy ledger for client-level DP; one per run.

    Parameters
    ----------
    clip : float
        L2 norm bound of one client's contribution (> 0).
    noise_multiplier : float
        Noise std over ``clip`` (> 0).
    delta : float
        The delta at which epsilon is reported, in (0, 1).
    """

    def __init__(self, clip: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5) -> None:
        self.clip = require_number("clip", clip, 0.0, low_open=True)
        self.noise_multiplier = require_number("noise_multiplier", noise_multiplier, 0.0, low_open=True)
        self.delta = require_number("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
        self._rounds: list[float] = []  # the sampling rate of every accounted round, in order
        self._accountant = self._new_accountant()

    def noisy_sum(self, contributions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clipped sum of ``[K, ...]`` contributions plus the Gaussian noise (`noisy_clipped_sum`)."""
        return noisy_clipped_sum(contributions, self.clip, self.noise_multiplier, rng)

    def spend(self, sampling_rate: float) -> None:
        """Account one round in which each client was sampled with probability `sampling_rate`."""
        from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent

        rate = require_number("sampling_rate", sampling_rate, 0.0, 1.0, low_open=True)
        with quiet_absl():  # fractional orders that do not converge are left out, with a warning each
            self._accountant.compose(PoissonSampledDpEvent(rate, GaussianDpEvent(self.noise_multiplier)))
        self._rounds.append(rate)

    @property
    def rounds(self) -> int:
        """Rounds accounted so far."""
        return len(self._rounds)

    @property
    def epsilon(self) -> float:
        """Epsilon at ``delta`` of every round so far (0 before the first)."""
        return float(self._accountant.get_epsilon(self.delta)) if self._rounds else 0.0

    def report(self) -> dict[str, float]:
        """``epsilon``, ``delta`` and the accountant's inputs: ``dp-noise-multiplier``, ``dp-clip``,
        ``dp-sampling-rate`` (the last round's), ``dp-rounds``."""
        return {"epsilon": self.epsilon, "delta": self.delta, "dp-noise-multiplier": self.noise_multiplier,
                "dp-clip": self.clip, "dp-sampling-rate": self._rounds[-1] if self._rounds else 0.0,
                "dp-rounds": float(self.rounds)}

    def state_dict(self) -> dict[str, list[float]]:
        """The sampling rate of every accounted round (the ledger replays exactly)."""
        return {"rounds": list(self._rounds)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        """Replay the rounds of `state` on a fresh ledger."""
        self._rounds, self._accountant = [], self._new_accountant()
        for rate in state["rounds"]:
            self.spend(rate)

    @staticmethod
    def _new_accountant() -> RdpAccountant:
        from dp_accounting import NeighboringRelation
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)

    def __repr__(self) -> str:
        return f"ClientDP(clip={self.clip:g}, noise_multiplier={self.noise_multiplier:g}, delta={self.delta:g})"


def dp_mean_probs(probs: np.ndarray, dp: ClientDP, rng: np.random.Generator) -> np.ndarray:
    """Soft targets ``[N, C]`` from clients' probabilities ``[K, N, C]``: the noisy clipped sum, negatives set
    to 0, rows renormalised (post-processing; a row that is 0 everywhere becomes uniform)."""
    total = np.clip(dp.noisy_sum(probs, rng), 0.0, None)
    sums = total.sum(axis=-1, keepdims=True)
    uniform = np.full_like(total, 1.0 / total.shape[-1])
    return np.where(sums > 0, total / np.where(sums > 0, sums, 1.0), uniform)


def dp_mean(contributions: np.ndarray, dp: ClientDP, rng: np.random.Generator, count: int) -> np.ndarray:
    """The noisy clipped sum over ``count`` (the denominator of a mean of logits or of weight updates)."""
    if count < 1 or math.isnan(count):
        raise ValueError(f"count must be >= 1, got {count}")
    return dp.noisy_sum(contributions, rng) / count


def dp_fedavg(global_state: dict[str, np.ndarray], client_states: list[dict[str, np.ndarray]], dp: ClientDP,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DP-FedAvg's new global weights: ``global + noisy clipped sum of updates / K`` (uniform weights).

    A client's update is the concatenation of its floating-point arrays minus the global ones, clipped as one
    vector; other arrays (integer counters) keep their global value. BatchNorm's running variances
    (``*running_var``) are clamped at 0 after the noise (post-processing: the guarantee is unchanged); noise
    drove them negative, and the model's outputs to NaN, on digits at noise multiplier 1.
    """
    keys = [k for k, v in global_state.items() if np.asarray(v).dtype.kind == "f"]
    flat_global = np.concatenate([np.ravel(global_state[k]) for k in keys]).astype(np.float64)
    updates = np.stack([np.concatenate([np.ravel(s[k]) for k in keys]) - flat_global for s in client_states])
    flat = flat_global + dp_mean(updates, dp, rng, len(client_states))
    new, start = dict(global_state), 0
    for key in keys:
        shape, dtype = np.shape(global_state[key]), np.asarray(global_state[key]).dtype
        size = int(np.prod(shape))
        values = flat[start:start + size].reshape(shape)
        new[key] = (np.maximum(values, 0.0) if key.endswith("running_var") else values).astype(dtype)
        start += size
    return new


def private_soft_targets(logits: np.ndarray, kind: str, dp: ClientDP, temperature: float,
                         rng: np.random.Generator) -> np.ndarray:
    """Soft targets ``[N, C]`` under client-level DP from teachers' logits ``[K, N, C]``.

    ``kind="probs"``: each client contributes its probabilities at `temperature` (`dp_mean_probs`);
    ``kind="logits"``: its logits, whose noisy mean is turned into probabilities at `temperature`.
    """
    from fedkd.aggregation.core import as_soft_targets, softmax

    if kind == "probs":
        return as_soft_targets(dp_mean_probs(softmax(logits, temperature), dp, rng))
    if kind == "logits":
        return as_soft_targets(softmax(dp_mean(logits, dp, rng, len(logits)), temperature))
    raise ValueError(f"kind={kind!r} must be 'probs' or 'logits'")


def dp_kind(aggregator: object, privacy: ClientDP | None) -> str | None:
    """What a client contributes under `privacy`: ``"probs"`` for ``mean_probs``, ``"logits"`` for
    ``mean_logits`` (a sum is what the noise protects); None without privacy.

    Raises
    ------
    ConfigError
        On ``aggregator`` when `privacy` is set and the aggregator is neither.
    """
    from fedkd.aggregation.averaging import mean_logits, mean_probs
    from fedkd.errors import ConfigError

    if privacy is None:
        return None
    if privacy is not None and not isinstance(privacy, ClientDP):
        raise ConfigError("privacy", privacy, "must be a fedkd.client_dp.ClientDP or null")
    func = getattr(aggregator, "func", aggregator)
    kinds = {mean_probs: "probs", mean_logits: "logits"}
    if func not in kinds:
        name = getattr(func, "__name__", type(func).__name__)
        raise ConfigError("aggregator", name, "client-level DP (privacy=client_dp) noises a sum of the "
                                              "clients' contributions: use mean_probs or mean_logits")
    return kinds[func]
