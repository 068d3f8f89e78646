"""How fast a bad value stops `fedkd-sim` / `fedkd-federation`: wall and CPU seconds, and the line.

Issue 11's "found late" values, each run as a user would (a fresh process, this checkout)::

    python -m benchmarks.config_stops            # prints a markdown table
    python -m benchmarks.config_stops --csv out.csv

The target is under 10 s of wall time on an idle machine, with one line naming the value and
what is allowed. Most of the time is Python importing torch, Hydra and Flower.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SIM = [sys.executable, "-m", "fedkd.simulations.main"]
FEDERATION = [sys.executable, "-m", "fedkd.deploy.cli"]
CASES = {
    "distill.optimizer.lr=-1": [*SIM, "distill.optimizer.lr=-1"],
    "seed=-1": [*SIM, "seed=-1"],
    "trimmed_mean fraction=0.7": [*SIM, "aggregator=trimmed_mean", "aggregator.fraction=0.7"],
    "era sharpen=0": [*SIM, "aggregator=era", "aggregator.sharpen=0"],
    "simulation.round_timeout=0": [*SIM, "simulation.round_timeout=0"],
    "num_clients=abc": [*SIM, "num_clients=abc"],
    "client_resources.num_cpus=0": [*SIM, "simulation.client_resources.num_cpus=0"],
    "client_resources.num_cpus=64": [*SIM, "simulation.client_resources.num_cpus=64"],
    "fedkd-federation run --rounds 0": [*FEDERATION, "run", "--rounds", "0"],
}


def run_case(command: list[str], folder: Path) -> dict[str, object]:
    """Run `command` in `folder`; its exit status, wall and CPU seconds, and its last line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDKD_CACHE_DIR": str(folder / "cache")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run([*command, f"hydra.run.dir={folder / 'out'}"]
                          if command[:3] == SIM else command,
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return {"exit": proc.returncode, "wall_s": round(wall, 2),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
            "lines": len(lines), "last_line": lines[-1] if lines else ""}


def main(argv: list[str] | None = None) -> None:
    """Run every case and print the table (optionally write it as CSV)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    rows, load = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, command) in enumerate(CASES.items()):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            rows.append({"value": name, **run_case(command, folder)})
            print(f"{name}: {rows[-1]['wall_s']} s", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    print(f"load average (1 min) at the start: {load:.2f}")
    print("| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns))
    for row in frame.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
