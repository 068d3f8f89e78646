"""`fedkd.run(...)`: the experiment `fedkd-sim` runs, from Python."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedkd.server import compose_config
from fedkd.simulations.run import run


def run_experiment(overrides: list[str] | None = None, out_dir: str | Path | None = None
                   ) -> dict[str, Any]:
    """Compose the config with `overrides`, run it, write the results, return the summary."""
    cfg = compose_config(list(overrides or []))
    if out_dir is None:
        out_dir = Path("outputs") / "api" / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    return run(cfg, out_dir)
