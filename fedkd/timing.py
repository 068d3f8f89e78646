"""Per-phase wall times of a client's round, for profiling (`distill.profile=true`).

A client times its phases (``restore``, ``digest``, ``revisit``, ``logits``, ``evaluate``,
``save``) and, when the run profiles, reports them as ``time-<phase>-s`` metrics; the plain-PyTorch
reference loop times the same phases, so `benchmarks.sim_vs_plain` can split a round side by side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fedkd.protocol import PHASES, phase_key

__all__ = ["PHASES", "PhaseTimer", "phase_key"]


class PhaseTimer:
    """Accumulates wall seconds per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the block as `phase` (added to earlier blocks of the same phase)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``{time-<phase>-s: seconds}`` of every phase timed."""
        return {phase_key(p): s for p, s in self.seconds.items()}
