"""Per-round latency of a run against its slowest client's compute time.

From a run's ``metrics.parquet``: the latency of round r is the time between the ends of rounds
r-1 and r as the server saw them (``elapsed_s``; round 1 counts from the start of the strategy,
so it includes waiting for the nodes and their first load of the app), and the slowest client's
compute time is the largest ``compute-s`` a node reported for round r (its handler's wall time).
The target of issue 5: latency <= 2 x slowest compute + 2 s.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

FACTOR, SLACK = 2.0, 2.0


def round_latency(metrics: pd.DataFrame | str | Path) -> pd.DataFrame:
    """One row per round: ``latency_s``, ``slowest_compute_s``, ``bound_s``, ``within``."""
    frame = pd.read_parquet(metrics) if isinstance(metrics, str | Path) else metrics
    wire = frame[(frame.metric == "elapsed_s") & (frame.client == -1)]
    elapsed = wire.groupby("round").value.max()
    compute = frame[frame.metric == "compute-s"].groupby("round").value.max()
    table = pd.DataFrame({"latency_s": elapsed.diff().fillna(elapsed),
                          "slowest_compute_s": compute})
    table = table.dropna().reset_index().rename(columns={"index": "round"})
    table["bound_s"] = FACTOR * table.slowest_compute_s + SLACK
    table["within"] = table.latency_s <= table.bound_s
    return table


def write_latency(out_dir: str | Path) -> pd.DataFrame:
    """Compute the table for a run folder and write ``latency.csv`` next to its metrics."""
    table = round_latency(Path(out_dir) / "metrics.parquet")
    table.to_csv(Path(out_dir) / "latency.csv", index=False, float_format="%.3f")
    return table
