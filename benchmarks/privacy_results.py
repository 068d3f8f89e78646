"""Collect a privacy sweep's runs into one tidy table (docs/results/privacy/).

Reads every ``summary.json`` under the given folders (runs of ``fedkd-sim`` with ``privacy=dpsgd``,
``privacy=client_dp``, ``aggregator=confident_vote`` or none, audited or not) and writes one row per run:
its settings (strategy, privacy, target epsilon, noise, seed), its accuracy, the epsilon it spent with the
accountant's inputs, and the membership-inference audit::

    python -m benchmarks.privacy_results sweeps/issue12/mnist --csv docs/results/privacy/mnist_dpsgd.csv
    python -m benchmarks.privacy_results sweeps/issue12/mnist --by strategy,target_epsilon   # means over seeds
    python -m benchmarks.privacy_results sweeps/issue12/mnist --plot mnist_dpsgd.png   # accuracy against epsilon
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger(__name__)

NO_DIGEST = ("fedavg", "local", "centralized")
"""Strategies whose clients never digest soft targets (``distill.alpha`` plays no part)."""
METRICS = ["final_mean_accuracy", "final_min_accuracy", "epsilon", "epsilon_data_independent",
           "audit_auc_mean", "audit_tpr_at_fpr_mean", "audit_global_auc_mean", "audit_global_tpr_at_fpr_mean"]


def _config(run: Path) -> Mapping[str, Any]:
    path = run / ".hydra" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else (
        yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {})


def _dpsgd(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Range of the per-client DP-SGD inputs (noise multiplier, sampling rate, steps)."""
    by_client = summary.get("dpsgd_by_client") or {}
    out: dict[str, Any] = {"epsilon": summary.get("dpsgd_epsilon_max"), "delta": summary.get("dpsgd_delta")}
    for key in ("noise_multiplier", "sample_rate", "steps"):
        values = [float(c[key]) for c in by_client.values() if c.get(key) is not None]
        out[f"{key}_min"] = min(values) if values else None
        out[f"{key}_max"] = max(values) if values else None
    return out


def run_row(run: Path) -> dict[str, Any]:
    """One run's settings and numbers."""
    summary = json.loads((run / "summary.json").read_text())
    cfg = _config(run)
    privacy = (cfg.get("privacy") or {}) if isinstance(cfg, dict) else {}
    name = privacy.get("name", "none")
    aggregator = summary.get("aggregator")
    row: dict[str, Any] = {
        "run": str(run), "strategy": summary.get("strategy"), "aggregator": aggregator,
        "dataset": summary.get("dataset"), "num_clients": summary.get("num_clients"),
        "num_rounds": summary.get("num_rounds"), "seed": summary.get("seed"), "status": summary.get("status"),
        "privacy": "confident_vote" if str(aggregator).startswith("ConfidentVote") else name,
        "target_epsilon": privacy.get("target_epsilon") if name == "dpsgd" else None,
        "alpha": None,  # the digest's KD weight: only a KD strategy digests
    }
    if summary.get("strategy") not in NO_DIGEST and isinstance(cfg, dict):
        row["alpha"] = (cfg.get("distill") or {}).get("alpha")
    if name == "dpsgd":
        row.update(_dpsgd(summary))
    elif summary.get("epsilon") is not None:  # client_dp, noisy or confident vote: the server's ledger
        row.update({k.replace("-", "_"): v for k, v in summary.items()
                    if k in ("epsilon", "delta", "epsilon-data-independent", "queries", "answered",
                             "dp-noise-multiplier", "dp-clip", "dp-sampling-rate", "dp-rounds",
                             "pate-threshold", "pate-sigma-threshold", "pate-sigma")})
    row.update({k: summary.get(k) for k in METRICS if k not in row})
    return row


def collect(folders: Sequence[Path]) -> pd.DataFrame:
    """Every run (a folder with ``summary.json``) under `folders`, one row each."""
    runs = sorted({p.parent for folder in folders for p in Path(folder).rglob("summary.json")})
    return pd.DataFrame([run_row(r) for r in runs])


def means(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Mean and std over seeds of the numeric columns, per group of `by`."""
    numeric = [c for c in METRICS if c in table and table[c].notna().any()]
    grouped = table.groupby(list(by), dropna=False)[numeric]
    out = grouped.agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out.insert(0, "seeds", grouped.size())
    return out.reset_index()


def plot_curve(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Accuracy against the DP-SGD target epsilon, one line per strategy (mean over seeds, every seed as a
    dot); runs without DP as a dashed line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    dp = table[table.privacy == "dpsgd"]
    several = dp.groupby("strategy").alpha.nunique() > 1  # strategies run with more than one digest alpha
    for i, ((strategy, alpha), runs) in enumerate(dp.groupby(["strategy", "alpha"], dropna=False)):
        color = f"C{i}"
        name = f"{strategy} (alpha {alpha:g})" if several.get(strategy, False) else strategy
        mean = runs.groupby("target_epsilon").final_mean_accuracy.mean()
        ax.plot(mean.index, mean.values, "o-", color=color, label=f"{name} + DP-SGD")
        ax.scatter(runs.target_epsilon, runs.final_mean_accuracy, color=color, s=12, alpha=0.5)
        plain = table[(table.privacy == "none") & (table.strategy == strategy)].final_mean_accuracy
        if len(plain) and not (several.get(strategy, False) and alpha != dp[dp.strategy == strategy].alpha.min()):
            ax.axhline(plain.mean(), color=color, ls="--", lw=1, label=f"{strategy}, no DP")
    ax.set_xscale("log", base=2)
    ticks = sorted(dp.target_epsilon.dropna().unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("epsilon per client for the run (delta 1e-5)")
    ax.set_ylabel("final mean test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--csv", type=Path, help="write the per-run table here")
    parser.add_argument("--by", help="comma-separated columns: print means over seeds per group")
    parser.add_argument("--plot", type=Path, help="write the accuracy-against-epsilon plot here (.png)")
    parser.add_argument("--title", default="", help="the plot's title")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = collect(args.folders)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        log.info("wrote %s (%d runs)", args.csv, len(table))
    if args.plot:
        plot_curve(table, args.plot, args.title)
        log.info("wrote %s", args.plot)
    shown = means(table, args.by.split(",")) if args.by else table.drop(columns=["run"])
    log.info("%s", shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


if __name__ == "__main__":
    main()
