"""`fedkd-compare`: one table and two plots that compare the arms of a sweep.

An *arm* is a set of runs with identical settings except the seed: the run's Hydra overrides
(``.hydra/overrides.yaml``) minus ``seed=...``, or, without that file, its summary's
``strategy, aggregator, dataset, partition, num_clients``. Labels show file paths by their
basename and leave out `SHARED_PATHS` that every run shares. Runs whose status is ``failed`` or
``interrupted`` are listed, not averaged; ``degraded`` runs are averaged and flagged (``--strict``
fails on any run that is not ``ok``). Every compared arm must have used the same partition; a
mismatch of partition hashes is flagged (`fedkd.simulations.compare_partitions`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fedkd.simulations.compare_labels import override_labels
from fedkd.simulations.compare_partitions import check_partitions
from fedkd.simulations.status import DEGRADED, FAILED, OK, STATUSES, USABLE

log = logging.getLogger("fedkd.compare")

FALLBACK = ("strategy", "aggregator", "dataset", "partition", "num_clients")
FIELDS = (*FALLBACK, "num_rounds", "seed", "status", "status_reasons", "error", "partition_hash",
          "final_mean_accuracy", "final_min_accuracy", "top5_own_accuracy", "bytes_up",
          "bytes_down", "wall_time_s", "audit_auc_mean", "audit_tpr_at_fpr_mean", "audit_fpr")
COLUMNS = ["arm", *FALLBACK, "num_rounds", "status", "seeds", "failed", "degraded", "final_acc_mean",
           "final_acc_std", "top5_own_mean", "top5_own_std", "worst_client_acc", "best_acc",
           "rounds_to_target", "seeds_reached", "bytes_up", "bytes_down", "bytes_per_round", "epsilon", "audit_auc",
           "audit_tpr_at_fpr", "wall_time_s",
           "partition_hash", "partition_ok"]
TOLERANCE = 1e-9  # rounds_to_target: float rounding, far below one test example
_SEED = re.compile(r"^[+~]*(seed|resume)=")  # not the arm: the seed, and resume= (same run)


class NoRunsError(FileNotFoundError):
    """No folder with a ``summary.json`` under the given path."""


# --- reading runs -------------------------------------------------------------------------
def load_runs(path: str | Path) -> pd.DataFrame:
    """Every run under `path`: any folder holding ``summary.json``, searched recursively.

    Parameters
    ----------
    path
        A multirun folder (or one run folder).

    Returns
    -------
    pd.DataFrame
        One row per run: ``run`` (its folder), ``arm`` (label), ``failed``, the summary's
        `FIELDS`, ``epsilon`` and ``per_round`` (a frame per run, see `per_round`).

    Raises
    ------
    NoRunsError
        No readable run under `path` (unreadable ones are skipped with a warning).
    """
    root = Path(path)
    rows = [row for p in sorted(root.rglob("summary.json")) if (row := load_run(p.parent))]
    if not rows:
        raise NoRunsError(f"no runs (folders with summary.json) under {root}")
    runs = pd.DataFrame(rows)
    runs["arm"] = arm_labels(runs)
    return runs


def load_run(run_dir: Path) -> dict[str, Any] | None:
    """The row of one run folder, or None (with a warning) if its summary is unreadable."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        log.warning("skipping %s: unreadable summary.json (%s)", run_dir, err)
        return None
    metrics = _read(run_dir / "metrics.parquet")
    overrides = _read(run_dir / ".hydra" / "overrides.yaml")
    status = summary.get("status", OK)  # runs from before statuses existed: ok
    if status not in STATUSES:
        log.warning("%s: unknown status %r, counted as failed", run_dir, status)
        status = FAILED
    return {"run": str(run_dir), **{k: summary.get(k) for k in FIELDS}, "status": status,
            "failed": status not in USABLE,
            "overrides": _arm_overrides(overrides),
            "epsilon": final_epsilon(summary, metrics), "per_round": per_round(metrics)}


def _read(path: Path) -> Any:
    """A run's metrics (parquet) or overrides (YAML); None if missing or (warning) unreadable."""
    if not path.is_file():
        return None
    try:
        if path.suffix != ".parquet":
            return yaml.safe_load(path.read_text())
        metrics = pd.read_parquet(path)
        if missing := {"round", "client", "metric", "value"} - set(metrics.columns):
            raise ValueError(f"missing columns {sorted(missing)}")
        return metrics
    except Exception as err:  # noqa: BLE001 - any broken file is skipped, not fatal
        log.warning("ignoring unreadable %s (%s)", path, err)
        return None


def _arm_overrides(overrides: Any) -> tuple[str, ...] | None:
    """The overrides that define the arm: sorted, without the seed (and ``resume=``, which
    continues the same run); None without a list."""
    if not isinstance(overrides, list):
        return None
    return tuple(sorted(str(o) for o in overrides if not _SEED.match(str(o)))) or None


def arm_labels(runs: pd.DataFrame) -> pd.Series:
    """Each run's arm label: its overrides, else the summary fields that differ between runs."""
    plain = runs[runs.overrides.isna()]
    keys = [k for k in FALLBACK if k == "strategy" or plain[k].nunique(dropna=False) > 1]
    fallback = plain.apply(lambda r: " ".join(f"{k}={r[k]}" for k in keys if pd.notna(r[k])),
                           axis=1)
    labels = override_labels(runs.overrides)
    return labels.fillna(fallback) if len(plain) else labels


def per_round(metrics: pd.DataFrame | None) -> pd.DataFrame:
    """Per round: ``accuracy`` (mean over clients), ``bytes`` (up + down), ``cum_bytes``."""
    if metrics is None or metrics.empty:
        return pd.DataFrame(columns=["accuracy", "bytes", "cum_bytes"], dtype=float)
    acc = metrics[metrics.metric == "test-accuracy"].groupby("round")["value"].mean()
    wire = metrics[metrics.metric.isin(["bytes_up", "bytes_down"])].groupby("round")["value"].sum()
    frame = pd.concat({"accuracy": acc, "bytes": wire}, axis=1).sort_index()
    frame["bytes"] = frame["bytes"].fillna(0.0)
    frame["cum_bytes"] = frame["bytes"].cumsum()
    return frame


def final_epsilon(summary: dict[str, Any], metrics: pd.DataFrame | None) -> float:
    """The summary's ``epsilon``, else the last ``epsilon`` metric row, else NaN."""
    if summary.get("epsilon") is not None:
        return float(summary["epsilon"])
    if metrics is None or "epsilon" not in set(metrics.metric):
        return float("nan")
    rows = metrics[metrics.metric == "epsilon"]
    return float(rows[rows["round"] == rows["round"].max()]["value"].max())


# --- statistics ---------------------------------------------------------------------------
def rounds_to_target(accuracy: pd.Series, target: float) -> float:
    """The first round (the index of `accuracy`) at or above `target`; NaN if none is.

    Values within `TOLERANCE` below count: a mean of accuracies lands a rounding error short
    of an exact target (the mean of 0.85 and 0.95 is 0.8999...).
    """
    hits = accuracy[accuracy >= target - TOLERANCE]
    return float(hits.index[0]) if len(hits) else float("nan")


def arm_table(runs: pd.DataFrame, target: float = 0.9, sort_by: str = "final_acc_mean",
              ascending: bool = False) -> pd.DataFrame:
    """One row per arm: statistics over its usable seeds (``ok`` or ``degraded``); failed and
    interrupted runs counted but not averaged.

    Parameters
    ----------
    runs
        From `load_runs`.
    target
        Accuracy for ``rounds_to_target`` (mean over the seeds that reach it, ``seeds_reached``).
    sort_by, ascending
        Row order (NaN last).

    Returns
    -------
    pd.DataFrame
        Columns `COLUMNS` (see docs/compare.md); ``status`` is the worst status of the arm's
        runs; ``partition_ok`` from `check_partitions`.
    """
    rows = []
    for arm, group in runs.groupby("arm", sort=False):
        ok = group[~group.failed]
        curves = [c["accuracy"].dropna() for c in ok.per_round]
        hits = pd.Series([rounds_to_target(c, target) for c in curves], dtype=float)
        best = pd.Series([c.max() for c in curves], dtype=float)
        num = {k: pd.to_numeric(ok[k], errors="coerce") for k in FIELDS}
        hashes = sorted({str(h) for h in group.partition_hash if pd.notna(h)})
        first = group.iloc[0]
        rows.append({
            "arm": arm, **{k: first[k] for k in (*FALLBACK, "num_rounds")},
            "status": worst_status(group.status), "seeds": len(ok),
            "failed": len(group) - len(ok), "degraded": int((group.status == DEGRADED).sum()),
            "final_acc_mean": num["final_mean_accuracy"].mean(),
            "final_acc_std": num["final_mean_accuracy"].std(),
            "top5_own_mean": num["top5_own_accuracy"].mean(),  # NaN: runs without own-label
            "top5_own_std": num["top5_own_accuracy"].std(),  # test chunks (older runs)
            "worst_client_acc": num["final_min_accuracy"].min(),
            "best_acc": best.mean(),  # NaN-skipping means, over the seeds that have curves
            "rounds_to_target": hits.mean(), "seeds_reached": int(hits.notna().sum()),
            "bytes_up": num["bytes_up"].mean(), "bytes_down": num["bytes_down"].mean(),
            "bytes_per_round": ((num["bytes_up"] + num["bytes_down"]) / num["num_rounds"]).mean(),
            "epsilon": ok.epsilon.max(),  # the worst case over seeds
            "audit_auc": num["audit_auc_mean"].mean(),  # membership inference (fedkd-audit)
            "audit_tpr_at_fpr": num["audit_tpr_at_fpr_mean"].mean(),
            "wall_time_s": num["wall_time_s"].mean(), "partition_hash": ",".join(hashes),
        })
    table = pd.DataFrame(rows, columns=COLUMNS[:-1])
    table["partition_ok"], _ = check_partitions(table)
    return table.sort_values(sort_by, ascending=ascending, na_position="last",
                             kind="stable").reset_index(drop=True)


def worst_status(statuses: Iterable[str]) -> str:
    """The worst of `statuses`: ok < degraded < interrupted < failed."""
    return max(statuses, key=STATUSES.index, default=OK)


def status_lines(runs: pd.DataFrame) -> list[str]:
    """``- <status>: `<run>`: <reasons>`` for every run that is not ``ok``, worst first."""
    lines = []
    for status in reversed(STATUSES[1:]):
        for r in runs[runs.status == status].itertuples():
            reasons = r.status_reasons if isinstance(r.status_reasons, list) else []
            lines.append(f"- {status}: `{r.run}`: {'; '.join(map(str, reasons)) or r.error}")
    return lines


# --- writing ------------------------------------------------------------------------------
def compare(path: str | Path, target: float = 0.9, out: str | Path | None = None,
            sort_by: str = "final_acc_mean", ascending: bool = False,
            command: str | None = None) -> dict[str, Path]:
    """Compare the arms under `path`; write the table and the plots into `out` (default `path`).

    `target`, `sort_by`, `ascending` as in `arm_table`; `command` heads the Markdown. Returns
    file name -> path of ``comparison.csv``, ``comparison.md`` and the two PNGs.
    """
    from fedkd.simulations.compare_plots import (arm_curves, plot_accuracy_vs_bytes,
                                                 plot_accuracy_vs_round, to_markdown)

    runs = load_runs(path)
    out = Path(out or path)
    out.mkdir(parents=True, exist_ok=True)
    table = arm_table(runs, target, sort_by, ascending)
    _, warnings = check_partitions(table)
    for w in warnings:
        log.warning("PARTITION MISMATCH: %s", w)
    header = (f"`{command or f'fedkd-compare {path} --target {target}'}`: {len(runs)} runs in "
              f"{len(table)} arms, target accuracy {target}, sorted by {sort_by}")
    failed = status_lines(runs)
    for line in failed:
        log.warning("%s%s", line[2:], "" if line.startswith(f"- {DEGRADED}") else
                    " (excluded from the stats)")
    paths = {name: out / name for name in ("comparison.csv", "comparison.md",
                                           "accuracy_vs_round.png", "accuracy_vs_bytes.png")}
    table.to_csv(paths["comparison.csv"], index=False)
    paths["comparison.md"].write_text(to_markdown(table, header, warnings, failed, FALLBACK))
    curves, order = arm_curves(runs), list(table.arm)
    plot_accuracy_vs_round(curves, paths["accuracy_vs_round.png"], order, target)
    plot_accuracy_vs_bytes(curves, paths["accuracy_vs_bytes.png"], order)
    log.info("compared %d runs in %d arms -> %s", len(runs), len(table), out)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; prints the Markdown table and the paths written.

    Exit 2: no runs; 1 with ``--strict`` when a run's status is not ``ok``; else 0.
    """
    parser = argparse.ArgumentParser(prog="fedkd-compare", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a multirun folder (searched recursively for summary.json)")
    parser.add_argument("--target", type=float, default=0.9, help="accuracy for rounds-to-target")
    parser.add_argument("--out", help="where to write (default: the multirun folder)")
    parser.add_argument("--sort", default="final_acc_mean", choices=COLUMNS, help="sort column")
    parser.add_argument("--ascending", action="store_true", help="sort ascending")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when any run is not ok (degraded, failed or interrupted)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        paths = compare(args.path, args.target, args.out, args.sort, args.ascending,
                        command=shlex.join(["fedkd-compare", *argv]))
    except NoRunsError as err:
        log.error("%s", err)
        return 2
    print(paths["comparison.md"].read_text())
    print("\n".join(str(p) for p in paths.values()))
    if args.strict:
        runs = load_runs(args.path)
        if (runs.status != OK).any():
            log.error("--strict: %d of %d runs are not ok", int((runs.status != OK).sum()),
                      len(runs))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
