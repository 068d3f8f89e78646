"""Plots of a run's tidy metric rows."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_accuracy(frame: pd.DataFrame, path: Path, title: str = "") -> None:
    """Test accuracy per round: mean over clients with a min-max band, one line per model."""
    acc = frame[frame.metric == "test-accuracy"]
    per_round = acc.groupby("round")["value"].agg(["mean", "min", "max"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.fill_between(per_round.index, per_round["min"], per_round["max"], alpha=0.15,
                    color="black", label="min-max over clients")
    ax.plot(per_round.index, per_round["mean"], color="black", lw=2.2, label="mean")
    for model, rows in acc.groupby("model"):
        line = rows.groupby("round")["value"].mean()
        ax.plot(line.index, line.values, lw=1.3, ls="--", label=f"{model} (mean)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
