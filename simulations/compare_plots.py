"""What `fedkd-compare` renders: the Markdown table and two figures (one colour per arm).

The figures draw `arm_curves`: per arm, the mean over its seeds of the per-round mean client
accuracy. The table comes from `fedkd.simulations.compare.arm_table`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger("fedkd.compare")


def arm_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm and round, over its non-failed seeds: accuracy mean/std/min/max, mean cum_bytes."""
    parts = []
    for arm, group in runs[~runs.failed].groupby("arm", sort=False):
        acc = pd.concat([c["accuracy"] for c in group.per_round], axis=1)
        cum = pd.concat([c["cum_bytes"] for c in group.per_round], axis=1)
        stats = acc.agg(["mean", "std", "min", "max", "count"], axis=1)
        parts.append(stats.assign(cum_bytes=cum.mean(axis=1), arm=arm).rename_axis("round")
                     .reset_index())
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["round", "mean", "std", "min", "max", "count", "cum_bytes", "arm"])


def _colours(order: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per arm, in table order (tab10, or tab20 beyond ten arms)."""
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    return {arm: cmap(i % cmap.N) for i, arm in enumerate(order)}


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path, title: str) -> None:
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_vs_round(curves: pd.DataFrame, path: Path, order: Sequence[str],
                           target: float | None = None) -> None:
    """Mean client accuracy per round, mean over seeds with a min-max band over seeds.

    Parameters
    ----------
    curves
        Rows ``arm, round, mean, min, max, count`` (see `arm_curves`).
    path
        The PNG to write.
    order
        Arms in legend order (those without curves are left out).
    target
        Draw a dashed line at this accuracy.
    """
    colours = _colours(order)
    fig, ax = plt.subplots(figsize=(10.5, 4.8), dpi=120)
    for arm in order:
        rows = curves[(curves.arm == arm)].dropna(subset=["mean"])
        if rows.empty:
            continue
        seeds = int(rows["count"].max())
        ax.fill_between(rows["round"], rows["min"], rows["max"], color=colours[arm], alpha=0.18,
                        lw=0)
        ax.plot(rows["round"], rows["mean"], color=colours[arm], lw=1.8,
                label=f"{arm} ({seeds} seed{'s' * (seeds != 1)})")
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean over clients)")
    ax.set_ylim(top=1.0)
    _finish(fig, ax, path, "mean over seeds; band: min-max over seeds")


def plot_accuracy_vs_bytes(curves: pd.DataFrame, path: Path, order: Sequence[str]) -> None:
    """Mean client accuracy against cumulative bytes on the wire (up + down), log x axis.

    Arms that sent nothing (a pooled baseline) cannot sit on a log axis: their last-round
    accuracy is a dotted horizontal line instead. Parameters as in `plot_accuracy_vs_round`.
    """
    colours = _colours(order)
    fig, ax = plt.subplots(figsize=(10.5, 4.8), dpi=120)
    silent = []
    for arm in order:
        rows = curves[(curves.arm == arm)].dropna(subset=["mean"])
        rows = rows[rows.cum_bytes > 0]
        if rows.empty:
            silent.append(arm)
            final = curves[curves.arm == arm]["mean"].dropna()
            if len(final):  # a reference line: the accuracy reached without any traffic
                ax.axhline(final.iloc[-1], color=colours[arm], ls=":", lw=1.5,
                           label=f"{arm} (no traffic; last round)")
            continue
        ax.plot(rows["cum_bytes"], rows["mean"], color=colours[arm], lw=1.6, marker="o", ms=3,
                label=arm)
        ax.plot(rows["cum_bytes"].iloc[-1:], rows["mean"].iloc[-1:], color=colours[arm],
                marker="s", ms=7)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes on the wire (up + down, mean over seeds)")
    ax.set_ylabel("test accuracy (mean over clients)")
    ax.set_ylim(top=1.0)
    if silent:
        log.info("accuracy_vs_bytes: no traffic (a dotted line): %s", ", ".join(silent))
    _finish(fig, ax, path, "one point per round, mean over seeds; square: last round")


def to_markdown(table: pd.DataFrame, header: str, warnings: Sequence[str] = (),
                failed: Sequence[str] = (), keys: Sequence[str] = ()) -> str:
    """The table as Markdown: ``0.919 ± 0.004``, ``1,710,800`` bytes, WARNING lines first.

    Accuracies without a value (``top-5 own-label`` of runs without own-label chunks) are ``-``.
    The membership-inference audit (``audit AUC``, ``audit TPR@1%FPR``: the students' means,
    `fedkd.simulations.audit`) is shown when an arm has one.

    `keys` are the config columns shown after the arm (`fedkd.simulations.compare.FALLBACK`).

    ``status`` is bold when an arm is not ``ok``; `failed` lines (the runs that are not ``ok``,
    with their reasons) follow the table.
    """
    def acc(m: float, s: float) -> str:
        return "-" if pd.isna(m) else f"{m:.3f}" + ("" if pd.isna(s) else f" ± {s:.3f}")

    def num(x: Any, fmt: str = ",.0f") -> str:
        return "" if pd.isna(x) else format(x, fmt)

    audited = "audit_auc" in table and table["audit_auc"].notna().any()  # fedkd-audit's columns
    lines = [f"**WARNING: partition mismatch: {w}**\n" for w in warnings] + [header, ""]
    head = ["arm", *keys, "status", "seeds", "failed", "degraded", "final accuracy",
            "top-5 own-label", "worst client", "best", "rounds to target (seeds)", "bytes up", "bytes down", "bytes / round",
            "epsilon", *(["audit AUC", "audit TPR@1%FPR"] if audited else []), "wall s",
            "partition hash", "partition ok"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        status = r.status if r.status == "ok" else f"**{r.status}**"
        cells = [r.arm, *(num(getattr(r, k), "") for k in keys), status, r.seeds, r.failed,
                 r.degraded, acc(r.final_acc_mean, r.final_acc_std),
                 acc(r.top5_own_mean, r.top5_own_std),
                 num(r.worst_client_acc, ".3f"), num(r.best_acc, ".3f"),
                 f"{num(r.rounds_to_target, '.1f') or '-'} ({r.seeds_reached}/{r.seeds})",
                 num(r.bytes_up), num(r.bytes_down), num(r.bytes_per_round), num(r.epsilon, ".3g"),
                 *([num(r.audit_auc, ".3f"), num(r.audit_tpr_at_fpr, ".3f")] if audited else []),
                 num(r.wall_time_s, ".1f"), r.partition_hash, "yes" if r.partition_ok else "**NO**"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join([*lines, *([""] if failed else []), *failed]) + "\n"
