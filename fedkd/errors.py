"""Exceptions shared across fedkd."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or input file is invalid.

    The message names the offending value and what is allowed, so the CLI can print it as is.
    """
