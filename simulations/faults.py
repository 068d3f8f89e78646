"""The ``faults`` config group of a simulation: its plan, and the ClientApp that applies it.

`fault_plan(cfg)` reads ``cfg.faults`` (`fedkd.checks.check_faults`; a bad value is a
ConfigError before anything starts); `with_faults` wraps fedkd's ClientApp in
`fedkd.client.faults.FaultyClientApp` when the plan names anyone. Faults are simulated only:
they need the simulation engine's ClientApp (``fedkd-sim``), never a deployed node's.
"""

from __future__ import annotations

from typing import Any

from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedkd.checks import check_faults
from fedkd.client.faults import FaultyClientApp
from fedkd.errors import ConfigError
from fedkd.faults import FaultPlan

SIMULATE = "fedkd.simulations.launch.simulate"
"""The runner that injects faults (Flower's simulation engine)."""


def fault_plan(cfg: DictConfig) -> FaultPlan | None:
    """The run's `FaultPlan` (None: no faults). Raises ConfigError for a bad ``faults`` value
    or faults under a runner that cannot inject them (the pooled baseline)."""
    plan = check_faults(cfg)
    runner = str((cfg.strategy.get("runner") or {}).get("_target_", SIMULATE))
    if plan is not None and runner != SIMULATE:
        raise ConfigError("strategy", str(cfg.strategy.name),
                          f"runs {runner}, which cannot inject faults: use faults=none")
    return plan


def with_faults(app: ClientApp, plan: FaultPlan | None) -> ClientApp:
    """`app` itself without a plan, else `app` with the plan's faults applied."""
    return app if plan is None else FaultyClientApp(app, plan)


def fault_summary(plan: FaultPlan | None) -> dict[str, Any]:
    """What ``summary.json`` says about the faults: the plan and the honest clients."""
    if plan is None:
        return {"faults": None}
    return {"faults": plan.describe(), "honest_clients": list(plan.honest)}
