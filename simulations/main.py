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

from fedkd.errors import ConfigError
from fedkd.server import CONF_DIR
from fedkd.simulations.run import Interrupted, StopSignals, run

log = logging.getLogger("fedkd")

FORCE_AFTER_S = 6.0  # a clean stop that takes longer ends the process (kills Ray's processes)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; bad config values exit with status 2 and one clear message."""
    try:
        summary = run(cfg, HydraConfig.get().runtime.output_dir,
                      stop=StopSignals(force_after=FORCE_AFTER_S))
    except Interrupted as stopped:
        exit_now(stopped.exit_code)
    except Exception as err:
        cause = config_cause(err)
        if cause is None:
            raise
        log.error("configuration error: %s", one_line(cause))
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


def one_line(err: BaseException) -> str:
    """The first line of an error message (OmegaConf appends key and type details below)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def config_cause(err: BaseException) -> BaseException | None:
    """The ConfigError (or OmegaConf error) behind `err`, if any, following the cause chain."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError | OmegaConfBaseException):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


if __name__ == "__main__":
    main()
