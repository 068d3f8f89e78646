"""`run(cfg)`: one experiment from a composed config, as a plain function."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf

from fedkd.server import PreparedRun, prepare_run
from fedkd.simulations.results import Recorder

Runner = Callable[[PreparedRun, Recorder], None]

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dir: str | Path, runner: Runner | None = None) -> dict[str, Any]:
    """Prepare the data, run the configured strategy, write the results to `out_dir`.

    `runner` defaults to the config's `strategy.runner` (the simulation engine, or the pooled
    baseline); `flwr run .` passes one that drives the Grid it was given. Returns the summary
    (also written to ``summary.json``). Results written before a failure stay on disk, and the
    summary says ``status: failed``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    prepared = prepare_run(cfg)
    if cfg.strategy.get("flower") is not None:  # a bad strategy setting fails before Flower starts
        hydra.utils.instantiate(cfg.strategy.flower)
    recorder = Recorder.for_run(prepared, out_dir)
    runner = runner or hydra.utils.instantiate(cfg.strategy.runner)
    status, error = "failed", None
    try:
        runner(prepared, recorder)
        status = "ok"
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        summary = recorder.finish(status=status, error=error)
    if summary["final_mean_accuracy"] is None:
        raise RuntimeError(f"no client reported a test accuracy; first error: {summary['error']}")
    log.info("final accuracy mean %.3f min %.3f max %.3f | up %s B down %s B | %.1f s -> %s",
             summary["final_mean_accuracy"], summary["final_min_accuracy"],
             summary["final_max_accuracy"], f"{summary['bytes_up']:,}",
             f"{summary['bytes_down']:,}", summary["wall_time_s"], out_dir)
    return summary
