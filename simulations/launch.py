"""The one adapter that launches Flower's simulation engine (Ray backend).

Everything else in fedkd talks to Flower through ServerApp/ClientApp and the Grid; only this
module knows how a simulation is started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import OmegaConf

from fedkd.server import PreparedRun, make_server_app
from fedkd.simulations.results import Recorder

log = logging.getLogger(__name__)

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class _DropDeprecations(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED" not in record.getMessage()


@contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Silence Flower's INFO chatter and deprecation notices unless `verbose`."""
    loggers = [logging.getLogger(name) for name in ("flwr", "alembic")]
    levels, drop = [lg.level for lg in loggers], _DropDeprecations()
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
            lg.addFilter(drop)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
            lg.removeFilter(drop)


def backend_config(sim: Any) -> dict[str, Any]:
    """Ray backend settings from the `simulation` config group."""
    init_args = {k: v for k, v in OmegaConf.to_container(sim.ray_init, resolve=True).items()
                 if v is not None}
    return {
        "client_resources": OmegaConf.to_container(sim.client_resources, resolve=True),
        "init_args": init_args,
    }


def simulate(run: PreparedRun, recorder: Recorder) -> None:
    """Run the prepared run in Flower's Ray-backed simulation engine, one SuperNode per client."""
    sim = run.cfg.simulation
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    server_app = make_server_app(run, [recorder.on_replies], recorder.on_server_metrics,
                                 recorder.out_dir)
    with quiet_flower(bool(sim.verbose)):
        from flwr.simulation import run_simulation  # its import logs through alembic

        from fedkd.client.app import app as client_app

        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=int(run.cfg.num_clients),
            backend_config=backend_config(sim),
            verbose_logging=bool(sim.verbose),
        )
