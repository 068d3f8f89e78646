"""Test helpers shared by several test modules (no fixtures here: see conftest.py)."""

from __future__ import annotations

from typing import TypeVar

from fedkd.settings import ClientSettings

S = TypeVar("S")


def bound(strategy: S, settings: ClientSettings) -> S:
    """`strategy` bound to the run `settings` describe (as `run_strategy` does), for chaining."""
    strategy.bind(settings)
    return strategy
