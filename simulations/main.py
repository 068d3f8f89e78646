"""`fedkd-sim`: the Hydra command line. It composes the config and calls `run(cfg)`.

SIGINT and SIGTERM stop it cleanly within `FORCE_AFTER_S` seconds: exit status 130 or 143,
``summary.json`` with ``status: interrupted``, no Ray process left behind.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fedkd.errors import error_line, find_config_error
from fedkd.server import CONF_DIR
from fedkd.simulations.run import Interrupted, StopSignals, run

log = logging.getLogger("fedkd")

FORCE_AFTER_S = 6.0  # a clean stop that takes longer ends the process (kills Ray's processes)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; a bad config value exits with status 2 and one line,
    ``configuration error: <key>=<value>: <what is allowed>``, before Ray starts."""
    try:
        summary = run(cfg, HydraConfig.get().runtime.output_dir,
                      stop=StopSignals(force_after=FORCE_AFTER_S))
    except Interrupted as stopped:
        exit_now(stopped.exit_code)
    except Exception as err:
        cause = find_config_error(err, also=(OmegaConfBaseException,))
        if cause is None:
            raise
        log.error("%s", error_line(cause))  # one line
        sys.exit(2)
    return summary["final_mean_accuracy"]


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
