"""`fedkd-sim`: the Hydra command line. It composes the config and calls `run(cfg)`.

SIGINT and SIGTERM stop it cleanly within `FORCE_AFTER_S` seconds: exit status 130 or 143,
``summary.json`` with ``status: interrupted``, no Ray process left behind.

Every failure leaves ``summary.json`` (``status: failed`` and the reason) in the run's folder. A
multirun (``-m``) goes on past a failed arm and exits with status 1 at the end, naming each
failed arm's folder; a stop by signal ends the whole multirun.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fedkd.errors import error_line, find_config_error
from fedkd.server import CONF_DIR
from fedkd.simulations.run import Interrupted, StopSignals, describe_error, run

log = logging.getLogger("fedkd")

FORCE_AFTER_S = 6.0  # a clean stop that takes longer ends the process (kills Ray's processes)
FAILED_ARMS: list[str] = []
"""Folders of this process's multirun arms that failed (`main` names them at the end)."""


def main() -> None:
    """`fedkd-sim`: one experiment, or a multirun that exits 1 if any of its arms failed."""
    FAILED_ARMS.clear()
    experiment()
    if FAILED_ARMS:
        log.error("%d arm(s) of the multirun failed (summary.json in each): %s",
                  len(FAILED_ARMS), ", ".join(FAILED_ARMS))
        sys.exit(1)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def experiment(cfg: DictConfig) -> float | None:
    """Run one experiment; a bad config value exits with status 2 and one line,
    ``configuration error: <key>=<value>: <what is allowed>``, before Ray starts.

    In a multirun a failed arm is recorded (`FAILED_ARMS`) and the next arm runs.
    """
    hydra_cfg = HydraConfig.get()
    out_dir, started = Path(hydra_cfg.runtime.output_dir), time.time()
    try:
        summary = run(cfg, out_dir, stop=StopSignals(force_after=FORCE_AFTER_S))
    except Interrupted as stopped:
        exit_now(stopped.exit_code)
    except Exception as err:
        cause = find_config_error(err, also=(OmegaConfBaseException,))
        reason = error_line(cause) if cause is not None else describe_error(err)
        record_failure(out_dir, reason, started)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("this arm failed: %s; the multirun goes on", reason,
                      exc_info=err if cause is None else None)
            FAILED_ARMS.append(str(out_dir))
            return None
        if cause is None:
            raise
        log.error("%s", reason)  # one line
        sys.exit(2)
    return summary["final_mean_accuracy"]


def record_failure(out_dir: Path, reason: str, since: float) -> None:
    """Write ``summary.json`` saying ``failed`` and why, unless the run wrote its own (since
    `since`, a ``time.time()``)."""
    file = out_dir / "summary.json"
    if not file.is_file() or file.stat().st_mtime < since:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"status": "failed", "error": reason, "last_round": 0,
                   "status_reasons": [reason]}
        file.write_text(json.dumps(summary, indent=2))


def exit_now(code: int) -> None:
    """Exit with `code` once logs are flushed, skipping the interpreter's teardown.

    The summary is written, Ray shut down and its processes reaped by now: nothing is left for
    atexit hooks and thread joins to do but to hang or crash on a half-stopped library.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
