"""The ServerApp that `flwr run` starts (``[tool.flwr.app.components]`` in pyproject.toml).

Run-config key ``overrides`` holds Hydra overrides; results land in ``<output-dir>/<run id>``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedkd.errors import ConfigError, error_line
from fedkd.server import compose_config, run_strategy
from fedkd.simulations.faults import fault_plan
from fedkd.simulations.run import run

log = logging.getLogger(__name__)
app = ServerApp()

SETTLE_S = 1.0
"""The simulated SuperNodes count as all registered once their number held this long."""


def simulated_node_count(grid: Grid, settle_s: float = SETTLE_S, timeout_s: float = 60.0,
                         poll_s: float = 0.05) -> int:
    """How many SuperNodes the simulation engine registered (``num-supernodes``).

    Flower 1.42 starts the ServerApp thread before it registers the simulated nodes (all of
    them at once, in one loop) and does not hand the federation config to the ServerApp: wait
    for the first node, then until the count has not changed for `settle_s` seconds.
    """
    end = time.monotonic() + timeout_s
    count, since = -1, time.monotonic()
    while True:
        now = time.monotonic()
        nodes = len(list(grid.get_node_ids()))
        if nodes != count:
            count, since = nodes, now
        elif (count > 0 and now - since >= settle_s) or now >= end:
            return count
        time.sleep(poll_s)


def check_supernodes(grid: Grid, num_clients: int, settle_s: float = SETTLE_S) -> None:
    """Refuse a simulation whose ``num-supernodes`` differs from ``num_clients``.

    Only under Flower's simulation engine (an ``InMemoryGrid``): in a deployment SuperNodes
    connect when they are ready and the strategy waits for them.

    Raises
    ------
    ConfigError
        One line naming both values and how to make them agree.
    """
    from flwr.superlink.grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        return
    nodes = simulated_node_count(grid, settle_s=settle_s)
    if nodes != num_clients:
        raise ConfigError(
            f"num-supernodes={nodes} (federation config) but num_clients={num_clients} "
            f"(run config): one SuperNode per client; run e.g. flwr run . --federation-config "
            f'"num-supernodes={num_clients}", or add num_clients={nodes} to overrides')


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: compose the config from the run config and run it on `grid`."""
    from fedkd.flower_compat import UnsupportedFlowerError, shorten_pull_backoff

    try:  # replies are visible before their objects: retry soon, not after 1 s
        shorten_pull_backoff()
    except UnsupportedFlowerError as err:  # only a speed-up: run without it
        logging.getLogger(__name__).warning("%s", err)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("fedkd")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    cfg = compose_config(str(context.run_config.get("overrides", "")).split())
    try:
        if fault_plan(cfg) is not None:  # the nodes run fedkd's ClientApp as it is
            raise ConfigError("faults are injected by fedkd-sim's simulated clients only; "
                              "flwr run takes faults=none")
        check_supernodes(grid, int(cfg.num_clients))
    except ConfigError as err:
        log.error("%s", error_line(err))  # the one line; Flower adds its traceback
        raise
    out_dir = Path(str(context.run_config.get("output-dir", "outputs/flwr"))) / str(grid.run.run_id)
    run(cfg, out_dir, runner=lambda prepared, recorder: run_strategy(
        grid, prepared, [recorder.on_replies], recorder.on_server_metrics, recorder.out_dir))
