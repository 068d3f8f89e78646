"""Example-level differential privacy for every client (DP-SGD with Opacus): settings, the plan,
the accountant, DP-compatible models.

Flower-free core. What runs under DP is in `fedkd.dp_training`; the ClientApp keeps each
client's accountant in its ``Context.state`` (`fedkd.client.dp_state`); docs/privacy.md states
what the guarantee covers.

Unit of privacy: one private row (example) of one client, add-or-remove-one neighbours. Each
DP-SGD step samples the client's private rows by Poisson sampling at rate
``q = min(1, batch_size / n)`` (Opacus's `UniformWithReplacementSampler`, the sampling its
accountants assume), clips every sampled row's gradient to ``max_grad_norm`` and adds Gaussian
noise of std ``noise_multiplier * max_grad_norm`` to the sum. The accountant (Opacus's RDP, or
PRV) composes one sampled Gaussian event per step over the whole run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedkd.errors import ConfigError, require_choice, require_keys, require_number

ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants a run may use (`opacus.accountants.create_accountant` names)."""
BATCHNORM = ("fix", "refuse")
"""What to do with a model that has BatchNorm: Opacus's ``ModuleValidator.fix`` (GroupNorm), or refuse."""
NOT_COVERED_STRATEGIES = ("fd", "centralized")
"""Strategies DP-SGD cannot protect: FD releases per-class mean logits computed on the private rows
(not a function of the DP model alone); ``centralized`` pools all rows on one trainer."""


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD settings of every client (``privacy=dpsgd``, conf/privacy/dpsgd.yaml)."""

    max_grad_norm: float = 1.0
    """Per-sample clipping norm C: every private row's gradient is scaled to L2 norm <= C."""
    noise_multiplier: float | None = None
    """Noise std over C. Null: derived from `target_epsilon` for the planned steps of the run."""
    target_epsilon: float | None = 8.0
    """Epsilon each client may spend over the whole run (used when `noise_multiplier` is null)."""
    delta: float = 1e-5
    """The delta at which epsilon is reported (and targeted)."""
    accountant: str = "rdp"
    """Opacus accountant: ``rdp`` (Renyi DP) or ``prv`` (privacy random variables)."""
    batchnorm: str = "fix"
    """Models with BatchNorm: ``fix`` (GroupNorm, Opacus's ModuleValidator) or ``refuse``."""

    def __post_init__(self) -> None:
        require_number("privacy.max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        require_number("privacy.noise_multiplier", self.noise_multiplier, 0.0, low_open=True,
                       null=True)
        require_number("privacy.target_epsilon", self.target_epsilon, 0.0, low_open=True,
                       null=True)
        require_number("privacy.delta", self.delta, 0.0, 1.0, low_open=True, high_open=True)
        require_choice("privacy.accountant", self.accountant, ACCOUNTANTS)
        require_choice("privacy.batchnorm", self.batchnorm, BATCHNORM)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("privacy.noise_multiplier", self.noise_multiplier,
                              "set exactly one of privacy.noise_multiplier and "
                              "privacy.target_epsilon (the other null)")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the settings JSON)."""
        return asdict(self)

    @classmethod
    def from_config(cls, privacy: Mapping[str, Any] | None) -> DPSettings | None:
        """The settings of a ``privacy`` config node; None unless its ``name`` is ``dpsgd``.

        Raises
        ------
        ConfigError
            A key that is no DP-SGD option, or a value out of range (named ``privacy.<key>``).
        """
        if not privacy or privacy.get("name") != "dpsgd":
            return None
        values = {k: v for k, v in privacy.items() if k != "name"}
        require_keys("privacy", values, cls.__dataclass_fields__)
        return cls(**values)


def check_dpsgd(dp: DPSettings, strategy: str, share_class_counts: bool,
                archs: Mapping[str, Mapping[str, Any]]) -> None:
    """What a DP-SGD run must not combine (`fedkd.checks.check_run` calls it).

    Raises
    ------
    ConfigError
        A strategy DP-SGD does not cover, shared class counts (the label histogram is no output
        of the DP model) or, with ``privacy.batchnorm=refuse``, an architecture with BatchNorm.
    """
    if strategy in NOT_COVERED_STRATEGIES:
        raise ConfigError("strategy", strategy, f"privacy=dpsgd does not cover {strategy} (it "
                          "releases statistics of the private rows that are not outputs of the "
                          "DP model); use fedmd, dsfl, local, fedavg or feddf")
    if share_class_counts:
        raise ConfigError("distill.share_class_counts", True, "must be false with privacy=dpsgd "
                          "(the class counts are the private label histogram, not DP)")
    if dp.batchnorm == "refuse":
        for name, spec in archs.items():
            if spec_has_batchnorm(spec):
                raise ConfigError(f"model.archs.{name}", "BatchNorm", "is refused with "
                                  "privacy.batchnorm=refuse (set privacy.batchnorm=fix, or "
                                  "batchnorm: false, or model=mlp)")


def spec_has_batchnorm(spec: Mapping[str, Any]) -> bool:
    """Whether a model spec builds BatchNorm layers, read from the spec (no input shape needed):
    its ``batchnorm`` argument (or the constructor's default), or the family's ``has_batchnorm``."""
    from fedkd.models.build import check_spec

    cls, kwargs = check_spec(dict(spec))
    params = inspect.signature(cls).parameters
    if "batchnorm" in params:
        return bool(kwargs.get("batchnorm", params["batchnorm"].default))
    return bool(getattr(cls, "has_batchnorm", False))


def dp_archs(dp: DPSettings | None, archs: Mapping[str, Mapping[str, Any]]
             ) -> dict[str, dict[str, Any]]:
    """The run's architectures, marked ``dp_compatible`` under DP-SGD (every builder of an arch
    then applies Opacus's ``ModuleValidator.fix``: `fedkd.models.build.DP_COMPATIBLE`)."""
    from fedkd.models.build import DP_COMPATIBLE

    if dp is None:
        return {name: dict(spec) for name, spec in archs.items()}
    return {name: {**spec, DP_COMPATIBLE: True} for name, spec in archs.items()}


# --- the plan and the accountant --------------------------------------------------------------
def sample_rate(batch_size: int, num_rows: int) -> float:
    """Poisson sampling rate of a client's private rows: ``min(1, batch_size / n)``."""
    return min(1.0, batch_size / num_rows) if num_rows > 0 else 1.0


def steps_per_epoch(batch_size: int, num_rows: int) -> int:
    """DP-SGD steps counted as one pass over the private rows: ``ceil(n / batch_size)``."""
    return max(1, math.ceil(num_rows / batch_size))


def derive_noise(dp: DPSettings, rate: float, steps: int) -> float:
    """The noise multiplier: the configured one, or Opacus's ``get_noise_multiplier`` for
    `target_epsilon` at `delta` after `steps` steps at sampling rate `rate`."""
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                                      sample_rate=rate, steps=max(1, steps),
                                      accountant=dp.accountant))


class Accountant:
    """One client's privacy ledger: an Opacus accountant and the inputs it was given.

    The ledger is Opacus's own ``history`` (``(noise_multiplier, sample_rate, steps)`` runs), so
    it is stored as plain numbers (`state_dict`) and rebuilt exactly (`load_state_dict`).

    Parameters
    ----------
    dp : DPSettings
        The run's settings (accountant, delta).
    noise_multiplier, rate : float
        This client's noise multiplier and Poisson sampling rate, fixed for the run.
    planned_steps : int
        The steps the noise was derived for (reported; the spent epsilon counts actual steps).
    """

    def __init__(self, dp: DPSettings, noise_multiplier: float, rate: float,
                 planned_steps: int) -> None:
        from opacus.accountants import create_accountant

        self.dp, self.noise_multiplier, self.rate = dp, float(noise_multiplier), float(rate)
        self.planned_steps = int(planned_steps)
        self._accountant = create_accountant(mechanism=dp.accountant)

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far."""
        return int(sum(s for _, _, s in self._accountant.history))

    def step(self) -> None:
        """Account one DP-SGD step (Opacus's ``accountant.step``)."""
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.rate)

    @property
    def epsilon(self) -> float:
        """Epsilon spent at ``dp.delta`` (0 before the first step)."""
        return float(self._accountant.get_epsilon(delta=self.dp.delta)) if self.steps else 0.0

    def report(self) -> dict[str, float]:
        """The spent (epsilon, delta) and the accountant's inputs, by their metric names."""
        from fedkd.protocol import (
            DP_DELTA, DP_EPSILON, DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE, DP_STEPS,
        )

        return {DP_EPSILON: self.epsilon, DP_DELTA: self.dp.delta,
                DP_NOISE_MULTIPLIER: self.noise_multiplier, DP_SAMPLE_RATE: self.rate,
                DP_STEPS: self.steps}

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the inputs and Opacus's history, flattened."""
        history = self._accountant.history
        return {"noise-multiplier": self.noise_multiplier, "sample-rate": self.rate,
                "planned-steps": self.planned_steps,
                "history-noise": [float(h[0]) for h in history],
                "history-rate": [float(h[1]) for h in history],
                "history-steps": [int(h[2]) for h in history]}

    @classmethod
    def from_state(cls, dp: DPSettings, state: Mapping[str, Any]) -> Accountant:
        """Inverse of `state_dict`."""
        accountant = cls(dp, float(state["noise-multiplier"]), float(state["sample-rate"]),
                         int(state["planned-steps"]))
        accountant._accountant.history = [
            (float(n), float(r), int(s)) for n, r, s in
            zip(state["history-noise"], state["history-rate"], state["history-steps"])]
        return accountant


def budget_steps(budget: Mapping[str, int | None], batch_size: int, num_rows: int) -> int:
    """DP-SGD steps of a revisit budget (`fedkd.settings.TrainSettings.local_budget`): its
    ``steps``, or ``epochs * ceil(n / batch_size)``."""
    if budget.get("steps") is not None:
        return int(budget["steps"])
    return int(budget["epochs"]) * steps_per_epoch(batch_size, num_rows)


def planned_steps(first: int, later: int, num_rounds: int) -> int:
    """The run's planned DP-SGD steps: this (first) round's, then `later` per remaining round.

    A client that skips rounds (``fraction_train < 1``) takes fewer steps than planned: its noise
    is then larger than its budget needs (never smaller); the reported epsilon counts the steps
    actually taken.
    """
    return max(1, int(first) + max(0, num_rounds - 1) * int(later))
