"""Collect the KD-families sweeps into tidy tables and a plot (docs/results/kd_families/).

Reads every ``summary.json`` under the given folders (runs of ``fedkd-sim``) and labels each run
by its knowledge family: the strategy, and what it adds (``relational`` and its relation rows,
``fedproto`` with or without logits, ``+self_kd`` from ``distill.losses``, FedDF's
``server_losses``). ``--by`` gives means over seeds, with the margin against a baseline family
(``--baseline``, default ``fedmd``) on the same dataset and partition::

    python -m benchmarks.kd_families sweeps/issue14 --csv runs.csv
    python -m benchmarks.kd_families sweeps/issue14 --by dataset,model,alpha,sweep,family --csv table.csv
    python -m benchmarks.kd_families sweeps/issue14/kd_digits --plot accuracy_vs_bytes.png
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.communication import _config, collect, finish_plot

log = logging.getLogger(__name__)


def family(cfg: dict[str, Any], strategy: str) -> str:
    """A run's knowledge family, e.g. ``relational (R=400)``, ``fedproto alone``,
    ``fedmd + self_kd``, ``feddf + rkd_distance + rkd_angle``."""
    client = (cfg.get("strategy") or {}).get("client") or {}
    flower = (cfg.get("strategy") or {}).get("flower") or {}
    losses = {**((cfg.get("distill") or {}).get("losses") or {}), **(client.get("losses") or {})}
    label = strategy
    if strategy == "relational":
        parts = [f"R={client.get('relation_rows')}"]
        if client.get("relation_topk"):
            parts.append(f"top-{client['relation_topk']}")
        if flower.get("relation_temperature", 0.1) != 0.1:
            parts.append(f"tau={flower['relation_temperature']:g}")
        if flower.get("propagation"):
            parts.append(f"propagation {flower['propagation']:g}")
        if not float((losses.get("relation_kd") or {}).get("weight", 0.0)):
            parts.append("no relation_kd")
        label += f" ({', '.join(parts)})"
    if strategy == "fedproto":
        label += " alone" if flower.get("aggregator") is None else " + logits"
    extras = [name for name in losses if name in ("self_kd", "exits")]
    server = [name for name in (flower.get("server_losses") or {}) if name != "kd"]
    return " + ".join([label, *extras, *server])


def run_row(run: Path) -> dict[str, Any]:
    """One run's settings and numbers."""
    summary = json.loads((run / "summary.json").read_text())
    cfg = _config(run)
    partitioner = ((cfg.get("partition") or {}).get("partitioner") or {})
    rounds = int(summary.get("num_rounds") or 1)
    up, down = int(summary.get("bytes_up") or 0), int(summary.get("bytes_down") or 0)
    return {
        "run": str(run), "sweep": run.parent.name, "dataset": summary.get("dataset"),
        "model": ",".join((cfg.get("model") or {}).get("cycle") or []) or "auto",
        "alpha": partitioner.get("alpha"), "strategy": summary.get("strategy"),
        "family": family(cfg, str(summary.get("strategy"))), "seed": summary.get("seed"),
        "num_rounds": rounds, "status": summary.get("status"),
        "final_mean_accuracy": summary.get("final_mean_accuracy"),
        "final_min_accuracy": summary.get("final_min_accuracy"),
        "bytes_per_round": (up + down) / rounds, "bytes_up": up, "bytes_down": down,
        "wall_s_per_round": float(summary.get("wall_time_s") or 0.0) / rounds,
    }


def summarise(runs: pd.DataFrame, by: Sequence[str], baseline: str = "fedmd") -> pd.DataFrame:
    """Means over seeds per `by` group (accuracy with its sd, bytes and wall per round), and
    ``margin_pts``: the group's mean accuracy minus the `baseline` family's in the same setting
    (every `by` column but ``family`` and ``sweep``), in points, when the baseline ran there."""
    by = list(by)
    table = runs.groupby(by, dropna=False).agg(
        seeds=("seed", "nunique"), accuracy=("final_mean_accuracy", "mean"),
        accuracy_std=("final_mean_accuracy", "std"), min_accuracy=("final_min_accuracy", "mean"),
        bytes_per_round=("bytes_per_round", "mean"),
        wall_s_per_round=("wall_s_per_round", "mean")).reset_index()
    keys = [k for k in by if k not in ("family", "sweep")]  # the setting: same data and split
    base = (table[table["family"] == baseline].groupby(keys, dropna=False)["accuracy"].mean()
            if keys else None)
    if base is not None and len(base):
        table["margin_pts"] = [
            100 * (row.accuracy - base.get(tuple(row[k] for k in keys) if len(keys) > 1
                                           else row[keys[0]], float("nan")))
            for _, row in table.iterrows()]
    return table


def plot(table: pd.DataFrame, path: Path) -> None:
    """Accuracy against bytes per round (log scale), one point per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for _, row in table.iterrows():
        spread = 0.0 if pd.isna(row["accuracy_std"]) else row["accuracy_std"]
        ax.errorbar(row["bytes_per_round"] / 1e6, row["accuracy"], yerr=spread, fmt="o", capsize=3)
        ax.annotate(row["family"], (row["bytes_per_round"] / 1e6, row["accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    finish_plot(fig, ax, path, "bytes per round, both directions (MB, log scale)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--by", help="comma-separated columns: means over the other runs")
    parser.add_argument("--baseline", default="fedmd", help="family the margins are against")
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--plot", type=Path, help="accuracy against bytes per round, by family")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = collect(args.folders, run_row)
    table = summarise(runs, args.by.split(","), args.baseline) if args.by else runs
    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(table.drop(columns=["run"], errors="ignore").to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.plot:
        plot(summarise(runs, ["family"], args.baseline), args.plot)


if __name__ == "__main__":
    main()
