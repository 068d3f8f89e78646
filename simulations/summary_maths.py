"""Small pure parts of a run's results: per-client means, FedGen's own-label metric, and files
written whole or not at all. `fedkd.simulations.results.Recorder` builds the summary from them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedkd.protocol import DP_DELTA, DP_METRICS, OWN_ACCURACY


def mean_by_client(frame: pd.DataFrame, metric: str) -> dict[str, float] | None:
    """Client -> the mean of `metric` over the rounds it was recorded in (None: never)."""
    rows = frame[(frame["metric"] == metric) & (frame["client"] >= 0)]
    if rows.empty:
        return None
    return {str(c): float(v) for c, v in rows.groupby("client")["value"].mean().items()}


def honest_mean(last: Mapping[int, tuple[int, float]], honest: list[int] | None) -> float | None:
    """Mean final accuracy of the `honest` clients (every client when None: no faults)."""
    values = [v for c, (_, v) in last.items() if honest is None or c in honest]
    return float(np.mean(values)) if values else None


def own_test_sizes(data: Any) -> list[int] | None:
    """Rows of each client's own-label test chunk in the prepared data (None without chunks)."""
    from fedkd.data.own_test import own_test_sizes as sizes  # the archive read once, not per client

    try:
        return sizes(data.cache_dir, len(data.client_sizes))
    except (OSError, ValueError):  # deployment: the nodes hold the data
        return None


def own_accuracy_rounds(frame: pd.DataFrame, sizes: list[int] | None) -> dict[int, float]:
    """Round -> own-label accuracy of the clients evaluated in it, weighted by their chunk size.

    FedGen's per-round metric: correct predictions over the evaluated users' own-label test
    chunks (`sizes`: rows per client's chunk). Unweighted without `sizes`.
    """
    rows = frame[frame["metric"] == OWN_ACCURACY]
    out: dict[int, float] = {}
    for server_round, group in rows.groupby("round"):
        clients = group["client"].to_numpy()
        weights = (np.ones(len(clients)) if not sizes else
                   np.array([sizes[c] if 0 <= c < len(sizes) else 0 for c in clients], float))
        if weights.sum() <= 0:
            weights = np.ones(len(clients))
        out[int(server_round)] = float(np.average(group["value"].to_numpy(), weights=weights))
    return out


def top_k_mean(values: list[float], k: int) -> float:
    """Mean of the `k` largest values (all of them when there are fewer)."""
    return float(np.mean(sorted(values, reverse=True)[:k]))


def write_text(text: str, path: Path) -> None:
    """Write `path` whole or not at all (a stop may end the process mid-write)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` to `path` whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def dpsgd_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """``privacy=dpsgd``: each client's last reported (epsilon, delta) and the accountant's
    inputs (noise multiplier, sample rate, steps), and the max epsilon over clients; {} without."""
    rows = frame[frame["metric"].isin(DP_METRICS) & (frame["client"] >= 0)]
    if rows.empty:
        return {}
    last = rows.sort_values("round", kind="stable").groupby(["client", "metric"])["value"].last()
    by_client = {str(c): {m.removeprefix("dp-").replace("-", "_"): float(v)
                          for m, v in last[c].items()}
                 for c in last.index.get_level_values(0).unique()}
    for values in by_client.values():
        values["steps"] = int(values["steps"])
    epsilons = [v["epsilon"] for v in by_client.values()]
    return {"dpsgd_epsilon_max": max(epsilons), "dpsgd_delta": float(last.xs(DP_DELTA, level=1).max()),
            "dpsgd_by_client": by_client}
