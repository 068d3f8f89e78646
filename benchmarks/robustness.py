"""Robust aggregation under Byzantine teachers and crashing clients: the sweep and its tables.

``sweep`` runs ``fedkd-sim -m`` with the ``byzantine_1of5`` / ``byzantine_2of10`` presets (every
attack x aggregator, one multirun per setting, seed and aggregator, skipped when its runs are
done, so that an interrupted sweep resumes where it stopped) and, as setting ``crash``, the 30%
crash run against its fault-free twin::

    python -m benchmarks.robustness sweep --out multirun/robustness
    python -m benchmarks.robustness table multirun/robustness --docs docs/results/robustness

``table`` reads every ``summary.json`` below the folders and writes ``byzantine.csv``,
``byzantine.md`` (honest clients' mean final accuracy per aggregator x attack, and its change
against the honest run: attack ``none``, the same seed, the same honest clients),
``crash.md`` and ``byzantine.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SETTINGS = {"1of5": "byzantine_1of5", "2of10": "byzantine_2of10"}
ATTACKS = ["none", "random", "sign_flip", "confident_wrong", "label_flip", "fixed_class", "scaled"]
ROBUST = ["reputation", "geometric_median", "median", "trimmed_mean"]
PLAIN = ["mean_probs", "mean_logits", "weighted", "entropy_weighted"]
AGGREGATORS = PLAIN + ROBUST
SEEDS = [0, 1, 2]
TOLERANCE = {"byzantine": 0.03, "crash": 0.02}
"""The issue's targets: the honest clients within 3 points (Byzantine) / 2 points (crashes)."""
DONE = ("ok", "degraded")


# --- the sweep ---------------------------------------------------------------------------------
def fedkd_sim(overrides: list[str]) -> int:
    """Run ``fedkd-sim`` (this checkout's) with `overrides`; its exit status."""
    cmd = [sys.executable, "-m", "fedkd.simulations.main", *overrides]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def finished(folder: Path, expected: int) -> bool:
    """Whether `folder` holds `expected` summaries of runs that finished (ok or degraded)."""
    found = [json.loads(p.read_text()) for p in folder.glob("*/summary.json")]
    return sum(s.get("status") in DONE for s in found) >= expected


def attacks_done(folder: Path) -> set[str]:
    """The attacks whose run below `folder` finished (ok or degraded)."""
    done = set()
    for path in folder.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary.get("status") in DONE:
            done.add((summary.get("faults") or {}).get("attack", "none"))
    return done


def sweep(out: Path, settings: list[str], aggregators: list[str], attacks: list[str],
          seeds: list[int]) -> None:
    """Per seed and setting: the Byzantine multiruns (one per aggregator: every attack), or for
    setting ``crash`` the 30% crash run and its fault-free twin (10 clients, default aggregator)."""
    for seed in seeds:
        for setting in settings:
            if setting == "crash":
                folder = out / "crash" / f"seed{seed}"
                if not finished(folder, 2):
                    fedkd_sim(["-m", "faults=none,crash", "num_clients=10", f"seed={seed}",
                               f"hydra.sweep.dir={folder}"])
                continue
            for aggregator in aggregators:
                folder = out / setting / f"seed{seed}" / aggregator
                todo = [a for a in attacks if a not in attacks_done(folder)]
                if todo:  # the arms an interrupted sweep left undone
                    fedkd_sim(["-m", f"+experiment={SETTINGS[setting]}", f"seed={seed}",
                               f"aggregator={aggregator}", f"faults.byzantine.attack={','.join(todo)}",
                               f"hydra.sweep.dir={folder}"])


# --- the tables ---------------------------------------------------------------------------------
def load(folders: list[Path]) -> pd.DataFrame:
    """One row per run below `folders`: setting, attack, aggregator, seed, status, accuracies."""
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("summary.json")):
            s = json.loads(path.read_text())
            faults = s.get("faults") or {}
            kind = ("byzantine" if "byzantine" in faults else "crash" if "crash" in faults
                    else "none")
            rows.append({
                "path": str(path.parent), "kind": kind, "num_clients": s.get("num_clients"),
                "attack": faults.get("attack", "none"),
                "aggregator": str(s.get("aggregator")).lower(),  # Reputation: a class
                "seed": s.get("seed"), "status": s.get("status"),
                "honest_clients": s.get("honest_clients"),
                "honest": s.get("final_mean_accuracy_honest"), "mean": s.get("final_mean_accuracy"),
                "by_client": s.get("final_accuracy_by_client"),
                "anomaly": s.get("anomaly_score_by_client"),
                "byzantine": faults.get("byzantine"),
            })
    return pd.DataFrame(rows)


def byzantine_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting, aggregator, attack: the honest clients' mean final accuracy over seeds, and
    its change against the honest run (attack none) of the same aggregator and seed."""
    runs = frame[(frame.kind == "byzantine") & frame.status.isin(DONE)].copy()
    runs["setting"] = runs.num_clients.map({5: "1of5", 10: "2of10"})
    honest = runs[runs.attack == "none"].set_index(["setting", "aggregator", "seed"])["honest"]
    runs["delta"] = [row.honest - honest.get((row.setting, row.aggregator, row.seed), np.nan)
                     for row in runs.itertuples()]
    best = runs[runs.attack == "none"].groupby(["setting", "seed"])["honest"].max()
    runs["delta_best"] = [row.honest - best.get((row.setting, row.seed), np.nan)
                          for row in runs.itertuples()]
    runs["anomaly_gap"] = [anomaly_gap(row.anomaly, row.byzantine) for row in runs.itertuples()]
    return (runs.groupby(["setting", "aggregator", "attack"])
            .agg(accuracy=("honest", "mean"), accuracy_std=("honest", "std"),
                 delta=("delta", "mean"), delta_min=("delta", "min"),
                 delta_best=("delta_best", "mean"), anomaly_gap=("anomaly_gap", "mean"),
                 seeds=("seed", "nunique"))
            .reset_index())


def anomaly_gap(scores: dict | None, byzantine: list | None) -> float:
    """Mean anomaly score of the Byzantine clients minus that of the others (nan without)."""
    if not scores or not byzantine:
        return float("nan")
    bad = [v for c, v in scores.items() if int(c) in byzantine]
    good = [v for c, v in scores.items() if int(c) not in byzantine]
    return float(np.mean(bad) - np.mean(good)) if bad and good else float("nan")


def crash_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per seed: the crash run's status and honest clients' mean, against the same clients in
    the fault-free run of that seed."""
    crash = frame[frame.kind == "crash"]
    clean = frame[(frame.kind == "none") & (frame.num_clients == 10)]
    rows = []
    for run in crash.itertuples():
        twin = clean[clean.seed == run.seed]
        if twin.empty:
            continue
        by_client = twin.iloc[0].by_client
        fault_free = float(np.mean([by_client[str(c)] for c in run.honest_clients]))
        rows.append({"seed": run.seed, "status": run.status, "honest_clients": run.honest_clients,
                     "crash_honest": run.honest, "fault_free_same_clients": fault_free,
                     "delta": run.honest - fault_free})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, setting: str) -> str:
    """Aggregator x attack: ``accuracy (delta vs honest run)``, in points."""
    part = table[table.setting == setting]
    attacks = [a for a in ATTACKS if a in set(part.attack)]
    order = [a for a in AGGREGATORS if a in set(part.aggregator)]
    lines = ["| aggregator | " + " | ".join(attacks) + " |",
             "|---|" + "---|" * len(attacks)]
    for aggregator in order:
        cells = []
        for attack in attacks:
            row = part[(part.aggregator == aggregator) & (part.attack == attack)]
            if row.empty:
                cells.append("-")
                continue
            r = row.iloc[0]
            delta = "" if attack == "none" else f" ({100 * r.delta:+.1f})"
            cells.append(f"{100 * r.accuracy:.1f}{delta}")
        lines.append(f"| {aggregator} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(table: pd.DataFrame) -> list[str]:
    """Per setting and attack: the best robust aggregator and whether it holds the target."""
    lines = []
    for (setting, attack), part in table[table.attack != "none"].groupby(["setting", "attack"]):
        robust = part[part.aggregator.isin(ROBUST)]
        if robust.empty:
            continue
        best = robust.loc[robust.delta.idxmax()]
        held = best.delta >= -TOLERANCE["byzantine"]
        lines.append(f"| {setting} | {attack} | {best.aggregator} | {100 * best.delta:+.1f} | "
                     f"{100 * best.delta_min:+.1f} | {100 * best.delta_best:+.1f} | "
                     f"{'yes' if held else 'NO'} | {int(best.seeds)} |")
    head = ["| setting | attack | best robust | mean change (points) | worst seed | "
            "vs best honest aggregator | within 3 points | seeds |",
            "|---|---|---|---|---|---|---|---|"]
    return head + lines


def worst_case(table: pd.DataFrame) -> list[str]:
    """Per setting and aggregator: its worst attack (mean change over seeds) and worst seed."""
    head = ["| setting | aggregator | worst attack | mean change (points) | worst seed | "
            "within 3 points under every attack |", "|---|---|---|---|---|---|"]
    lines = []
    attacked = table[table.attack != "none"]
    for (setting, aggregator), part in attacked.groupby(["setting", "aggregator"]):
        worst = part.loc[part.delta.idxmin()]
        held = part.delta.min() >= -TOLERANCE["byzantine"]
        lines.append((setting, AGGREGATORS.index(aggregator) if aggregator in AGGREGATORS else 99,
                      f"| {setting} | {aggregator} | {worst.attack} | {100 * worst.delta:+.1f} | "
                      f"{100 * part.delta_min.min():+.1f} | {'yes' if held else 'no'} |"))
    return head + [line for *_, line in sorted(lines)]


def plain_markdown(frame: pd.DataFrame) -> str:
    """A markdown table of `frame` (floats to 4 decimals), without extra dependencies."""
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    """Heat maps of the change against the honest run, one per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted(set(table.setting))
    fig, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        part = table[(table.setting == setting) & (table.attack != "none")]
        grid = part.pivot(index="aggregator", columns="attack", values="delta") * 100
        grid = grid.reindex(index=[a for a in AGGREGATORS if a in grid.index],
                            columns=[a for a in ATTACKS if a in grid.columns])
        image = ax.imshow(grid.to_numpy(), cmap="RdYlGn", vmin=-60, vmax=5, aspect="auto")
        ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=35, ha="right")
        ax.set_yticks(range(len(grid.index)), grid.index)
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            if np.isfinite(value):
                ax.text(j, i, f"{value:+.0f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{setting} Byzantine: honest clients' accuracy change (points)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_tables(folders: list[Path], docs: Path) -> None:
    """Write the CSV, markdown tables and plot of the runs below `folders` into `docs`."""
    docs.mkdir(parents=True, exist_ok=True)
    frame = load(folders)
    table = byzantine_table(frame)
    table.to_csv(docs / "byzantine.csv", index=False, float_format="%.4f")
    parts = []
    for setting in sorted(set(table.setting)):
        parts += [f"### {setting}", "", markdown(table, setting), ""]
    parts += ["### Best robust aggregator per attack", "", *verdict(table), ""]
    parts += ["### Each aggregator's worst attack", "", *worst_case(table), ""]
    (docs / "byzantine.md").write_text("\n".join(parts))
    if not table.empty:
        plot(table, docs / "byzantine.png")
    crash = crash_table(frame)
    crash.to_csv(docs / "crash.csv", index=False, float_format="%.4f")
    (docs / "crash.md").write_text(plain_markdown(crash) if not crash.empty else "no crash runs\n")
    print((docs / "byzantine.md").read_text())
    print((docs / "crash.md").read_text())


def main(argv: list[str] | None = None) -> None:
    """``sweep`` or ``table``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("sweep", help="run the multiruns (skips finished ones)")
    run.add_argument("--out", type=Path, default=Path("multirun/robustness"))
    run.add_argument("--settings", default=",".join([*SETTINGS, "crash"]))
    run.add_argument("--aggregators", default=",".join(ROBUST + PLAIN))
    run.add_argument("--attacks", default=",".join(ATTACKS))
    run.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    table = sub.add_parser("table", help="tables and plot from the summaries")
    table.add_argument("folders", type=Path, nargs="+")
    table.add_argument("--docs", type=Path, default=Path("docs/results/robustness"))
    args = parser.parse_args(argv)
    if args.command == "sweep":
        sweep(args.out, args.settings.split(","), args.aggregators.split(","),
              args.attacks.split(","), [int(s) for s in args.seeds.split(",")])
    else:
        write_tables(args.folders, args.docs)


if __name__ == "__main__":
    main()
