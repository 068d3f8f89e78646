"""The ServerApp that `flwr run` starts (``[tool.flwr.app.components]`` in pyproject.toml).

Run-config key ``overrides`` holds Hydra overrides; results land in ``<output-dir>/<run id>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedkd.server import compose_config, run_strategy
from fedkd.simulations.run import run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: compose the config from the run config and run it on `grid`."""
    from fedkd.flower_compat import shorten_pull_backoff

    shorten_pull_backoff()  # replies are visible before their objects: retry soon, not after 1 s
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("fedkd")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    cfg = compose_config(str(context.run_config.get("overrides", "")).split())
    out_dir = Path(str(context.run_config.get("output-dir", "outputs/flwr"))) / str(grid.run.run_id)
    run(cfg, out_dir, runner=lambda prepared, recorder: run_strategy(
        grid, prepared, [recorder.on_replies], recorder.on_server_metrics, recorder.out_dir))
