"""Per-run table of the FedGen MNIST sweeps: accuracy of the students evaluated in the last round.

    python docs/results/fedgen_mnist/round_table.py sweeps/issue10 [--csv runs.csv]

`summary.json`'s ``final_mean_accuracy`` takes each client's last full-test evaluation; with 10 of
20 clients per round and the full test set every 20 rounds, some of those predate round 200. This
table also gives the mean over the students evaluated in the last round itself.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from fedkd.simulations.compare import load_runs


def runs(root: Path) -> pd.DataFrame:
    """One row per run folder under `root` (read by `fedkd-compare`'s `load_runs`)."""
    rows = []
    for run in load_runs(root).itertuples():
        alpha = re.search(r"alpha=([\d.]+)", Path(run.run).name)
        accuracy = run.per_round["accuracy"].dropna()
        rounds = max(int(run.per_round.index.max()) if len(run.per_round) else 1, 1)
        rows.append({
            "strategy": run.strategy,
            "alpha": float(alpha.group(1)) if alpha else None,
            "seed": run.seed,
            "status": run.status,
            "last_round_mean": 100 * accuracy.iloc[-1] if len(accuracy) else None,
            "final_mean": 100 * run.final_mean_accuracy if run.final_mean_accuracy else None,
            "top5_own": 100 * run.top5_own_accuracy if run.top5_own_accuracy else None,
            "mb_per_round": (run.bytes_up + run.bytes_down) / 1e6 / rounds,
            "wall_s": run.wall_time_s,
        })
    return pd.DataFrame(rows).sort_values(["strategy", "alpha", "seed"]).reset_index(drop=True)


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, which fedkd does not depend on)."""
    cells = frame.astype(object).where(frame.notna(), "")
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    frame = runs(args.root)
    print(markdown(frame.round(2)))
    means = frame[frame.status == "ok"].groupby(["strategy", "alpha"])
    summary = means.agg(seeds=("seed", "count"), last_round_mean=("last_round_mean", "mean"),
                        last_round_std=("last_round_mean", "std"), top5_own=("top5_own", "mean"),
                        mb_per_round=("mb_per_round", "mean")).reset_index()
    print()
    print(markdown(summary.round(2)))
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
