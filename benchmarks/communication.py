"""Collect a communication sweep into one tidy table and a plot (docs/results/communication/).

Reads every ``summary.json`` under the given folders (runs of ``fedkd-sim`` with ``codec=...``)
and writes one row per run: strategy, codec, seed, final accuracy and the bytes that crossed
the wire (counted encoded, both directions). ``--by`` gives means over seeds with the byte ratio
against a reference (``fedavg`` with codec ``none`` unless ``--reference`` says otherwise)::

    python -m benchmarks.communication sweeps/issue13/digits --csv runs.csv
    python -m benchmarks.communication sweeps/issue13/digits --by strategy,codec --csv table.csv
    python -m benchmarks.communication sweeps/issue13/digits --plot accuracy_vs_bytes.png
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger(__name__)


def _config(run: Path) -> dict[str, Any]:
    for path in (run / ".hydra" / "config.yaml", run / "config.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def codec_label(codec: dict[str, Any] | None) -> str:
    """``none``, ``int8``, ``topk2``, ...: the codec's name, and k for top-k."""
    codec = codec or {}
    name = str(codec.get("name", "none"))
    return f"{name}{codec['k']}" if name == "topk" and "k" in codec else name


def run_row(run: Path) -> dict[str, Any]:
    """One run's settings and numbers."""
    summary = json.loads((run / "summary.json").read_text())
    cfg = _config(run)
    distill = cfg.get("distill") or {}
    up, down = int(summary.get("bytes_up") or 0), int(summary.get("bytes_down") or 0)
    return {
        "run": str(run), "dataset": summary.get("dataset"), "strategy": summary.get("strategy"),
        "codec": codec_label(cfg.get("codec")), "seed": summary.get("seed"),
        "num_clients": summary.get("num_clients"), "num_rounds": summary.get("num_rounds"),
        "digest_epochs": distill.get("digest_epochs"), "status": summary.get("status"),
        "final_mean_accuracy": summary.get("final_mean_accuracy"),
        "final_min_accuracy": summary.get("final_min_accuracy"),
        "bytes_up": up, "bytes_down": down, "bytes_total": up + down,
    }


def collect(folders: Sequence[Path], row: Callable[[Path], dict[str, Any]] | None = None
            ) -> pd.DataFrame:
    """Every run (a folder with ``summary.json``) under `folders`, one `row` each (default:
    `run_row`); SystemExit when there is none."""
    runs = sorted({p.parent for folder in folders for p in Path(folder).rglob("summary.json")})
    if not runs:
        raise SystemExit(f"no summary.json under {[str(f) for f in folders]}")
    return pd.DataFrame([(row or run_row)(r) for r in runs])


def finish_plot(fig: Any, ax: Any, path: Path, xlabel: str) -> None:
    """Log-scale bytes on x, accuracy on y, a grid; saved to `path` and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final mean test accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(runs: pd.DataFrame, by: Sequence[str], reference: tuple[str, str] = ("fedavg", "none")
              ) -> pd.DataFrame:
    """Means (and the accuracy's standard deviation) over seeds per `by` group, with
    ``bytes_ratio``: the reference group's mean total bytes over this group's (how many times
    fewer bytes), and ``accuracy_gap``: this group's mean accuracy minus the reference's."""
    table = runs.groupby(list(by), dropna=False).agg(
        seeds=("seed", "nunique"), accuracy=("final_mean_accuracy", "mean"),
        accuracy_std=("final_mean_accuracy", "std"), bytes_up=("bytes_up", "mean"),
        bytes_down=("bytes_down", "mean"), bytes_total=("bytes_total", "mean")).reset_index()
    ref = table[(table.get("strategy") == reference[0]) & (table.get("codec") == reference[1])] \
        if {"strategy", "codec"} <= set(by) else table.iloc[0:0]
    if len(ref):
        table["bytes_ratio"] = float(ref["bytes_total"].iloc[0]) / table["bytes_total"]
        table["accuracy_gap"] = table["accuracy"] - float(ref["accuracy"].iloc[0])
    return table.sort_values("bytes_total", ascending=False)


def plot(table: pd.DataFrame, path: Path) -> None:
    """Accuracy against total bytes (log scale), one series per strategy, codecs labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for strategy, group in table.groupby("strategy"):
        ax.errorbar(group["bytes_total"] / 1e6, group["accuracy"],
                    yerr=group["accuracy_std"].fillna(0), fmt="o", capsize=3, label=strategy)
        for _, row in group.iterrows():
            ax.annotate(row["codec"], (row["bytes_total"] / 1e6, row["accuracy"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.legend()
    finish_plot(fig, ax, path, "total bytes, both directions, whole run (MB, log scale)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--by", help="comma-separated columns: means over the other runs")
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--plot", type=Path, help="accuracy against bytes (means by strategy, codec)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = collect(args.folders)
    table = summarise(runs, args.by.split(",")) if args.by else runs
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.plot:
        plot(summarise(runs, ["strategy", "codec"]), args.plot)


if __name__ == "__main__":
    main()
