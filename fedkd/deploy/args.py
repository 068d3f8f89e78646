"""Command-line flags of the deployment commands, refused as config values are: in one line.

``fedkd-federation`` and ``fedkd-supernode`` check every flag before they start a process; a
refusal reads ``configuration error: <flag>=<value>: <what is allowed>`` (`fedkd.errors`), and
argparse's own refusals (a flag it does not know, a value of the wrong type) read
``configuration error: argument --rounds: invalid int value: 'abc'``. Exit status 2, no usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fedkd.errors import ConfigError, error_line


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose refusals are one line (see the module doc)."""

    def error(self, message: str) -> NoReturn:
        """argparse's refusal, as a configuration error."""
        self.refuse(ConfigError(message))

    def refuse(self, err: BaseException) -> NoReturn:
        """Print `err` as one line and exit with status 2."""
        line = error_line(err) if isinstance(err, ConfigError) else f"{self.prog}: {err}"
        print(line, file=sys.stderr)  # noqa: T201 - the one line a user reads
        raise SystemExit(2)
