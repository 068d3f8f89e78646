"""How a fedkd simulation scales with the number of clients at a fixed number of active ones.

    python -m benchmarks.scale --clients 100 1000 10000 50000 --active 100 --rounds 5 \
        [--json out.json] [--out DIR] [--timeout S] [hydra overrides...]

One simulation per client count, each in its own process (so one run's memory does not count in
the next): MNIST files (`MNIST_DIR`), ``partition=iid``, MLP students, one epoch of warm-up,
revisit and digest, ``strategy.flower.fraction_train = active / clients``, clients profiled
(``distill.profile=true``), the whole test set evaluated in the last round only (the own-label
chunk every round). Per run it records the data preparation time, wall time per round (from the
end of each round's last wave), the ``query.whoami`` wave that maps nodes to partitions,
peak memory of the process tree (`benchmarks.sim_vs_plain.TreeMemory`), bytes down/up per round
(wire rows), and the clients' set-up time (``time-restore-s``: settings, data, student) and its
share of their time. A run that fails or passes ``--timeout`` is reported with what it reached.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd

MNIST_DIR = Path(os.environ.get("FEDKD_MNIST_DIR", "/work/shared/data/mnist"))
TRAIN, TEST = MNIST_DIR / "mnist_train.npz", MNIST_DIR / "mnist_test.npz"
STAGE, WAVES = "stage.json", "waves.jsonl"
"""A run folder's progress marker (which step the run is in: a stopped run says where) and its
waves as they end (round, message type, messages, bytes, s since the Recorder started)."""


def base_overrides(clients: int, active: int, rounds: int) -> list[str]:
    """The scale run's config: MNIST, iid, MLP, one epoch of each kind of local work."""
    return [
        "dataset=files", f"dataset.path={TRAIN}", f"dataset.test_path={TEST}",
        "dataset.public_size=1000", "partition=iid", "model=mlp",
        f"num_clients={clients}", f"num_rounds={rounds}",
        f"strategy.flower.fraction_train={min(1.0, active / clients)}",
        "distill.warmup_epochs=1", "distill.local_epochs=1", "distill.digest_epochs=1",
        f"distill.eval_every={rounds}", "distill.profile=true",
    ]


def round_table(waves: list[dict[str, Any]]) -> pd.DataFrame:
    """Per round, from the waves the Recorder saw: ``end_s`` (s since the Recorder started, at
    the end of the round's last wave), ``wall_s`` (that round alone), ``bytes_down`` and
    ``bytes_up`` (all waves of the round, the ``query.whoami`` wave included)."""
    frame = pd.DataFrame(waves, columns=["round", "type", "sent", "bytes_down", "bytes_up", "t"])
    table = frame.groupby("round").agg(end_s=("t", "max"), bytes_down=("bytes_down", "sum"),
                                       bytes_up=("bytes_up", "sum"))
    table["wall_s"] = table["end_s"].diff().fillna(table["end_s"])
    return table


def setup_share(frame: pd.DataFrame) -> dict[str, float | None]:
    """Clients' set-up (``restore``) time: mean per client round, sum, and share of all phases."""
    from fedkd.protocol import PHASES, phase_key

    phases = frame[frame["metric"].isin([phase_key(p) for p in PHASES])]
    restore = phases[phases["metric"] == phase_key("restore")]["value"]
    total = float(phases["value"].sum())
    return {"restore_mean_ms": round(1000 * float(restore.mean()), 2) if len(restore) else None,
            "restore_sum_s": round(float(restore.sum()), 3),
            "client_phases_sum_s": round(total, 3),
            "restore_share": round(float(restore.sum()) / total, 4) if total else None}


def summarize(waves: list[dict[str, Any]], frame: pd.DataFrame | None) -> dict[str, Any]:
    """Wall per round (the first, the mean of the later ones), bytes per round, the whoami
    wave, and (from a metrics.parquet frame) the clients' set-up share."""
    if not waves:
        return {"rounds_done": 0}
    rounds = round_table(waves)
    later = rounds.iloc[1:] if len(rounds) > 1 else rounds
    whoami = [w for w in waves if w["type"] == "query.whoami"]
    return {
        "rounds_done": int(rounds.index.max()),
        "round_wall_s": {int(r): round(float(v), 3) for r, v in rounds["wall_s"].items()},
        "first_round_s": round(float(rounds["wall_s"].iloc[0]), 3),
        "later_round_mean_s": round(float(later["wall_s"].mean()), 3),
        "bytes_down_round1": int(rounds["bytes_down"].iloc[0]),
        "bytes_down_per_round": int(later["bytes_down"].mean()),
        "bytes_up_per_round": int(later["bytes_up"].mean()),
        "whoami_messages": sum(w["sent"] for w in whoami),
        "loadavg_mean": round(sum(w.get("load", 0.0) for w in waves) / len(waves), 2),
        **(setup_share(frame) if frame is not None else {}),
    }


def read_waves(folder: Path) -> list[dict[str, Any]]:
    """The waves a run wrote to ``waves.jsonl`` so far."""
    file = folder / WAVES
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def write_stage(folder: Path, stage: str, **extra: Any) -> None:
    """Note the step a run is in (read back if it is stopped)."""
    (folder / STAGE).write_text(json.dumps({"stage": stage, "time": time.time(), **extra}))


def measure(clients: int, active: int, rounds: int, overrides: list[str], folder: Path,
            flower_dispatch: bool = False) -> dict[str, Any]:
    """Prepare and simulate one client count in this process; return its measurements
    (`flower_dispatch`: with Flower's own message dispatcher, not fedkd's one-pass one)."""
    import fedkd.simulations.run as sim_run
    import fedkd.strategies.partitions as partitions
    from benchmarks.flower_dispatch import flower_own_dispatch
    from benchmarks.sim_vs_plain import TreeMemory, timed_hooks
    from fedkd.server import compose_config, prepare_run
    from fedkd.simulations.results import Recorder

    load_start, start = os.getloadavg()[0], time.time()
    for name in (STAGE, WAVES, "result.json"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "run", ignore_errors=True)
    cfg = compose_config([*base_overrides(clients, active, rounds), *overrides])
    cache_root = Path(str(cfg.simulation.cache_dir)).expanduser()
    before = set(cache_root.iterdir()) if cache_root.is_dir() else set()
    write_stage(folder, "prepare")
    with TreeMemory(since=start) as prep_mem:
        t = time.monotonic()
        prepare_run(cfg)
        prepare_s = time.monotonic() - t
    fresh = bool(set(cache_root.iterdir()) - before)
    write_stage(folder, "simulate", prepare_s=prepare_s)
    marks: dict[str, float] = {}
    identify, on_replies = partitions.identify, Recorder.on_replies

    def timed_identify(*args: Any, **kwargs: Any) -> None:
        t = time.monotonic()
        identify(*args, **kwargs)
        marks["whoami_s"] = marks.get("whoami_s", 0.0) + time.monotonic() - t

    def spy(self: Recorder, server_round: int, replies: list, stats: Any) -> None:
        wave = {"round": server_round, "type": stats.message_type, "sent": stats.sent,
                "bytes_down": stats.bytes_down, "bytes_up": stats.bytes_up,
                "t": round(time.monotonic() - self._t0, 4), "load": os.getloadavg()[0]}
        with open(folder / WAVES, "a") as f:
            f.write(json.dumps(wave) + "\n")
        on_replies(self, server_round, replies, stats)

    out = folder / "run"
    with timed_hooks(marks), TreeMemory(since=start) as sim_mem, \
            mock.patch.object(partitions, "identify", timed_identify), \
            mock.patch.object(Recorder, "on_replies", spy), \
            flower_own_dispatch() if flower_dispatch else nullcontext():
        t, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        summary = sim_run.run(cfg, out)
        sim_wall = time.monotonic() - t
        used = resource.getrusage(resource.RUSAGE_SELF)
    driver_cpu = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    frame = pd.read_parquet(out / "metrics.parquet")
    return {
        "clients": clients, "active": active, "rounds": rounds, "overrides": overrides,
        "dispatch": "flower" if flower_dispatch else "one-pass",
        "prepare_s": round(prepare_s, 2), "prepare_fresh": fresh,
        "run_setup_s": round(marks["recorder"] - t, 2),  # prepare again, results set-up
        "prepare_peak_rss_gib": prep_mem.result()["peak_main_rss_gib"],
        "sim_wall_s": round(sim_wall, 2), "driver_cpu_s": round(driver_cpu, 1),
        **summarize(read_waves(folder), frame),
        "ray_init_s": round(marks.get("ray_init_s", float("nan")), 2),
        "whoami_s": round(marks.get("whoami_s", 0.0), 2),
        **{k: v for k, v in sim_mem.result().items() if k != "samples"},
        "final_mean_accuracy": summary.get("final_mean_accuracy"),
        "loadavg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }


def run_child(clients: int, args: argparse.Namespace, overrides: list[str],
              root: Path) -> dict[str, Any]:
    """`measure` one client count in a fresh process; on failure or timeout, what it reached."""
    folder = root / f"clients_{clients}{'_flower' if args.flower_dispatch else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    result_file = folder / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--one", str(clients), "--active",
           str(args.active), "--rounds", str(args.rounds), "--folder", str(folder),
           *(["--flower-dispatch"] if args.flower_dispatch else []), *overrides]
    t = time.monotonic()
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
            why = None if code == 0 else f"exit code {code} (see {folder / 'log.txt'})"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # a clean stop: Ray shut down, results kept
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            why = f"stopped after the {args.timeout} s timeout"
    if why is None:
        return json.loads(result_file.read_text())
    stage = json.loads((folder / STAGE).read_text()) if (folder / STAGE).is_file() else {}
    partial: dict[str, Any] = {"clients": clients, "stopped": why,
                               "stage": stage.get("stage"), "elapsed_s": time.monotonic() - t}
    if "prepare_s" in stage:
        partial["prepare_s"] = round(stage["prepare_s"], 2)
    metrics = folder / "run" / "metrics.parquet"
    partial.update(summarize(read_waves(folder),
                             pd.read_parquet(metrics) if metrics.is_file() else None))
    return partial


COLUMNS = {
    "clients": "clients", "dispatch": "dispatch", "prepare_s": "prepare s",
    "run_setup_s": "run set-up s", "first_round_s": "round 1 s", "later_round_mean_s": "later round s",
    "driver_cpu_s": "driver CPU s", "peak_rss_gib": "peak RSS GiB", "peak_pss_gib": "peak PSS GiB",
    "bytes_down_per_round": "down B/round", "bytes_up_per_round": "up B/round",
    "restore_mean_ms": "restore ms", "restore_share": "restore share",
    "loadavg": "load start/mean", "stopped": "stopped",
}


def table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per client count, the columns of `COLUMNS` (memory also relative to the first)."""
    rows = []
    for r in results:
        row = {k: r.get(k) for k in COLUMNS if k != "loadavg"}
        row["loadavg"] = "/".join(f"{v:.1f}" for v in [*r.get("loadavg_1min", [])[:1],
                                                       r.get("loadavg_mean", float("nan"))])
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["RSS vs first"] = (frame["peak_rss_gib"] / frame["peak_rss_gib"].iloc[0]).round(2)
    return frame.rename(columns=COLUMNS)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options, and Hydra overrides (every ``key=value`` argument without a leading ``-``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000, 50000])
    parser.add_argument("--active", type=int, default=100, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write every measurement as JSON here")
    parser.add_argument("--out", help="folder for scale_<dispatch>.csv")
    parser.add_argument("--runs", help="folder for the runs (logs, metrics; default: a temp one)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="s per client count")
    parser.add_argument("--flower-dispatch", action="store_true",
                        help="Flower's own O(nodes x messages) dispatcher, not fedkd's one-pass one")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return parser.parse_args([a for a in argv if a not in overrides]), overrides


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.one is not None:
        import logging
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
        folder = Path(args.folder)
        result = measure(args.one, args.active, args.rounds, overrides, folder,
                         args.flower_dispatch)
        (folder / "result.json").write_text(json.dumps(result, indent=2))
        return
    if not (TRAIN.is_file() and TEST.is_file()):
        print(f"benchmarks.scale: MNIST files not found ({TRAIN}, {TEST}); set FEDKD_MNIST_DIR "
              "to a folder holding mnist_train.npz and mnist_test.npz. Skipped.")
        return
    root = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="fedkd-scale-"))
    print(f"runs (logs, metrics.parquet, waves.jsonl) in {root}", flush=True)
    results = []
    for clients in args.clients:
        results.append(run_child(clients, args, overrides, root))
        print(f"{clients} clients: {json.dumps(results[-1])}", flush=True)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table(results).to_string(index=False))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"scale_{'flower' if args.flower_dispatch else 'one_pass'}.csv"
        table(results).to_csv(Path(args.out) / name, index=False)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
